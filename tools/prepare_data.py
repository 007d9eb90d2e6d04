"""LLaVA-format JSON (or JSONL) + image folder, or a MedMNIST .npz -> webdataset tar shards
with a validation report (records skipped and counted by reason, never silently).

    python tools/prepare_data.py --json data.json --image-folder images --output SHARDS
    python tools/prepare_data.py --medmnist pneumoniamnist.npz --split train \\
        --label-names normal,pneumonia --modality X-Ray --output SHARDS
    python tools/prepare_data.py --hf-dataset vqa-rad/ --split train --output SHARDS

A record without `image` and without `<image>` is a text-only conversation (the shard holds its
JSON alone); one with an `images` list (prior and current study) needs one `<image>` per image,
stored in that order. Reasons: malformed, missing_image, corrupt_image, image_too_large (more than
--max-image-pixels: never decoded), path_outside_root (an image path leading outside
--image-folder, symlinks followed: never opened), no_image_token (an image but no <image>),
image_count_mismatch (more
<image> tokens than the record's one image), empty_answer, unknown_role, not_utf8, too_long,
dicom_frame_missing (--dicom-frames N past the file's frames). DICOM images are stored as the
PNG of each frame asked for, windowed by the standard (data/dicom.py); the report counts them by
how (`dicom_frames_by_windowing`: file_window, voi_lut, override, percentile, colour, palette).
The report (per-shard record counts included) is printed and written to OUTPUT/report.json;
training reads the shards against it. An OUTPUT that already holds files is refused unless
--overwrite, which replaces it once the new shards are complete.
"""

import argparse
import io
import sys
from pathlib import Path


def medmnist_records(path, split, label_names, modality):
    """(records, reader): one closed-set classification question per image, phrased as VQA."""
    import numpy as np
    from PIL import Image

    data = np.load(path)
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in data:
            raise SystemExit(f"error: {path} has no {key!r} (keys: {sorted(data.files)})")
    images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    if int(labels.max()) >= len(label_names):
        raise SystemExit(f"error: label {int(labels.max())} but only {len(label_names)} "
                         f"--label-names")
    options = ", ".join(label_names)
    blobs = {}
    records = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{Path(path).stem}_{split}_{i:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        blobs[name] = buf.getvalue()
        records.append({"id": f"{Path(path).stem}-{split}-{i}", "image": name,
                        "modality": modality, "answer_type": "CLOSED",
                        "labels": list(label_names), "conversations": [
                            {"from": "human", "value": f"<image>\nWhich class does this image "
                                                        f"show? Options: {options}."},
                            {"from": "gpt", "value": label_names[int(label)]}]})
    return records, lambda record: blobs.get(str(record.get("image")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--json", help="LLaVA JSON list or JSONL")
    src.add_argument("--medmnist", help="MedMNIST .npz")
    src.add_argument("--hf-dataset", help="a local Hugging Face dataset folder (parquet files "
                     "as on the hub, or a save_to_disk Arrow folder), read offline with the "
                     "datasets library")
    p.add_argument("--columns", help="--hf-dataset: FIELD=COLUMN,... for image, question, "
                   "answer, id, answer_type, modality (default image=image,question=question,"
                   "answer=answer; docs/data.md has VQA-RAD's, SLAKE's and PathVQA's)")
    p.add_argument("--image-folder", help="images referenced by the JSON's `image` field (or "
                   "by --hf-dataset's image column when it holds file names)")
    p.add_argument("--split", default="train", help="MedMNIST or --hf-dataset split (train, "
                   "val / validation, test)")
    p.add_argument("--label-names", help="MedMNIST: comma-separated names, index = label")
    p.add_argument("--modality", help="MedMNIST: modality label of every record")
    p.add_argument("--output", required=True, help="shard folder")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-chars", type=int, default=8000, help="longer records are skipped")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--max-images-per-sample", type=int, default=4,
                   help="a record of more images (an `images` list) is skipped "
                        "(too_many_images)")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="images with more pixels are skipped (image_too_large) before "
                        "decoding (default: PIL's decompression-bomb limit, ~89.5M)")
    from medmoe_mcore.data import dicom

    dicom.add_arguments(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that already holds files (atomically, "
                        "once the new shards are complete)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.data.images import DEFAULT_MAX_PIXELS
    try:  # a bad flag is named before any record is read
        dicom_options = dicom.options_of(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from medmoe_mcore.data.records import folder_reader, load_json_records, write_shards

    import tempfile

    cache = tempfile.TemporaryDirectory(prefix="medmoe-hf-datasets-")
    if args.hf_dataset:
        from medmoe_mcore.data import hf_datasets

        try:
            data = hf_datasets.load(args.hf_dataset, args.split, cache.name)
            records, reader = hf_datasets.records(
                data, hf_datasets.parse_columns(args.columns), args.image_folder,
                name=f"{Path(args.hf_dataset).name}-{args.split}")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.columns:
        print("error: --columns goes with --hf-dataset", file=sys.stderr)
        return 2
    elif args.json:
        if not args.image_folder:
            raise SystemExit("error: --json needs --image-folder")
        if not Path(args.image_folder).is_dir():
            raise SystemExit(f"error: --image-folder {args.image_folder}: not a folder")
        reader = folder_reader(args.image_folder)
        try:
            records = load_json_records(args.json)
        except (ConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        if not args.label_names:
            raise SystemExit("error: --medmnist needs --label-names")
        records, reader = medmnist_records(args.medmnist, args.split,
                                           args.label_names.split(","), args.modality)
    try:
        report = write_shards(records, reader, args.output,
                              samples_per_shard=args.samples_per_shard,
                              max_chars=args.max_chars, prefix=args.prefix, total=len(records),
                              show_progress=not args.no_progress, overwrite=args.overwrite,
                              max_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS,
                              dicom_options=dicom_options,
                              max_images=args.max_images_per_sample)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache.cleanup()
    print(report.to_json())
    print(f"wrote {report.written} records in {len(report.shards)} shard(s) to {args.output}; "
          f"skipped {sum(report.skipped.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
