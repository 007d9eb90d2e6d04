"""Med-VQA datasets as users download them from the Hugging Face hub: a local dataset folder
(parquet shards, as the hub stores VQA-RAD, SLAKE and PathVQA, or a `save_to_disk` Arrow
folder) read through the `datasets` library, offline, into Med-MoE records for
data/records.write_shards (the same checks, skips and report as the JSON path).

A column mapping names where each field is (`--columns image=image,question=question,...`);
the defaults fit the hub's VQA-RAD and PathVQA (`image`, `question`, `answer`) and SLAKE with
`--columns image=img_name,answer_type=answer_type,modality=modality --image-folder imgs/`. The
image column holds the images (a `datasets` Image feature: its bytes) or file names under
`--image-folder`. The answer type is closed when the answer is yes or no, unless a column says
(OPEN/CLOSED); modality comes from a column when one is mapped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.conventions import IMAGE_TOKEN

FIELDS = ("image", "question", "answer", "id", "answer_type", "modality")
DEFAULT_COLUMNS = {"image": "image", "question": "question", "answer": "answer"}
CLOSED_ANSWERS = ("yes", "no")


def parse_columns(text: Optional[str]) -> dict:
    """`field=column,...` over the defaults; an unknown field or a bad pair is named."""
    columns = dict(DEFAULT_COLUMNS)
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        field, _, column = pair.partition("=")
        field, column = field.strip(), column.strip()
        if field not in FIELDS or not column:
            raise ConfigError(f"--columns {text}: {pair!r} is not FIELD=COLUMN with FIELD one "
                              f"of {', '.join(FIELDS)}")
        columns[field] = column
    return columns


def load(folder, split: str, cache_dir):
    """The split of a local dataset folder, through `datasets`, never the network: a
    `save_to_disk` folder (state.json / dataset_dict.json) or data files (parquet, ...)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # a local folder only: never the hub
    import datasets

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--hf-dataset {folder}: not a folder")
    try:
        if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
            data = datasets.load_from_disk(str(folder))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ConfigError(f"--hf-dataset {folder}: no split {split!r} (splits: "
                                      f"{', '.join(data)}); choose one with --split")
                data = data[split]
            return data
        return datasets.load_dataset(str(folder), split=split, cache_dir=str(cache_dir))
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many kinds (no data files, unknown split, ...)
        raise ConfigError(f"--hf-dataset {folder} (split {split}): cannot read it with the "
                          f"datasets library ({type(e).__name__}: {str(e)[:300]})") from None


def records(data, columns: dict, image_folder=None, name: str = "hf"
            ) -> tuple[list, Callable[[dict], Optional[bytes]]]:
    """(records, image reader) of a `datasets.Dataset` under a column mapping; a mapped column
    the dataset lacks is refused naming it before any record is made."""
    import datasets

    from medmoe_mcore.data.records import folder_reader

    missing = [f"{field}={column}" for field, column in columns.items()
               if column not in data.column_names]
    if missing:
        raise ConfigError(f"--columns: the dataset has no column {', '.join(missing)} (its "
                          f"columns: {', '.join(data.column_names)})")
    image_column = columns["image"]
    stored = isinstance(data.features[image_column], datasets.Image)
    if stored:  # the image bytes as stored, never decoded here (bombs are checked later)
        data = data.cast_column(image_column, datasets.Image(decode=False))
    elif image_folder is None:
        raise ConfigError(f"--columns image={image_column}: the column holds file names "
                          f"({data.features[image_column]}); give --image-folder")
    blobs, out = {}, []
    for i, row in enumerate(data):
        rid = str(row[columns["id"]]) if "id" in columns else f"{name}-{i}"
        answer, question = row[columns["answer"]], row[columns["question"]]
        record = {"id": rid, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"
             if isinstance(question, str) else question},
            {"from": "gpt", "value": str(answer) if answer is not None else answer}]}
        kind = row.get(columns.get("answer_type", ""), None)
        if isinstance(kind, str) and kind.strip().upper() in ("OPEN", "CLOSED"):
            record["answer_type"] = kind.strip().upper()
        else:
            closed = str(answer).strip().lower() in CLOSED_ANSWERS
            record["answer_type"] = "CLOSED" if closed else "OPEN"
        if "modality" in columns and row[columns["modality"]] is not None:
            record["modality"] = str(row[columns["modality"]])
        value = row[image_column]
        if stored:
            image = value or {}
            record["image"] = f"{rid}{Path(str(image.get('path') or 'x.png')).suffix or '.png'}"
            blobs[rid] = image.get("bytes")
        else:
            record["image"] = value
        out.append(record)
    if stored:
        return out, lambda record: blobs.get(record["id"])
    return out, folder_reader(image_folder)
