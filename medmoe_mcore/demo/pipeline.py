"""The embedded demo's steps: demo data and tokenizer, a random `tiny` starting model (it stands
in for CLIP + Phi-2: nothing can be downloaded), the stages' configs, the router step and the
summary. examples/pretrain_medmoe.py runs them in order, creating the process groups each
step needs (library code never does)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import option
from medmoe_mcore.config.flavors import LANGUAGE_FLAVORS, medmoe_language, vision_flavor
from medmoe_mcore.config.model import ModelConfig, ParallelConfig
from medmoe_mcore.data.records import read_shards, shard_paths
from medmoe_mcore.data.tokenizer import Tokenizer, train_bpe
from medmoe_mcore.demo import dataset
from medmoe_mcore.eval.predict import predict, test_questions
from medmoe_mcore.eval.scoring import evaluate_predictions, table
from medmoe_mcore.inference.config import GenerationConfig
from medmoe_mcore.inference.engine import load_for_inference
from medmoe_mcore.models.medmoe import MedMoEModel
from medmoe_mcore.router import file as router_file
from medmoe_mcore.router.training import train_from_checkpoint
from medmoe_mcore.runtime.parallel import log
from medmoe_mcore.training.config import TrainConfig

DEMO_TRAIN_ITERS = 200  # per stage
DEMO_LR = 1e-3


@dataclass
class PipelineConfig:
    # `stage=False`: meaningless for a single-stage run, which refuses it.
    flavor: str = option("tiny", "model preset of the demo pipeline; with --stage, checked "
                         "against the checkpoint's shape", choices=tuple(LANGUAGE_FLAVORS))
    work_dir: str = option("medmoe_demo", "demo pipeline outputs: data, tokenizer, checkpoints, "
                           "router", stage=False)
    router: Optional[str] = option(None, "demo pipeline: upcycle with this router file instead "
                                   "of training one", stage=False)


def prepare_demo(pipe: PipelineConfig, seed: int) -> tuple[dict, Tokenizer, Path]:
    """(shards by stage, tokenizer, starting checkpoint); needs TP=1 process groups."""
    work = Path(pipe.work_dir)
    if dist.get_rank() == 0:  # data and tokenizer once, then everyone reads them
        dataset.build(work / "data")
        if not (work / "tokenizer" / "tokenizer.json").exists():
            train_bpe(dataset.corpus(work / "data"), work / "tokenizer")
    dist.barrier()
    shards = dataset.build(work / "data", show_progress=False)
    tok = Tokenizer(work / "tokenizer")
    log(f"demo data in {work / 'data'}; tokenizer: {tok.vocab_size} pieces, <image> = "
        f"{tok.image_token_id}")
    init = work / "checkpoints" / "init"
    if not store.is_checkpoint(init):
        cfg = ModelConfig(language=medmoe_language(pipe.flavor),
                          vision=vision_flavor(pipe.flavor, tok.image_token_id))
        store.save(MedMoEModel(cfg).sharded_state_dict(), init, cfg,
                           extra_dirs={store.TOKENIZER: work / "tokenizer"})
    return shards, tok, init


def replace_previous(folder: Path) -> None:
    """The demo owns its work folder: a previous demo run's output about to be written again is
    removed first, and the log says so (a save never replaces another run's work silently)."""
    folder = Path(folder)
    if dist.get_rank() == 0 and folder.exists():
        log(f"demo pipeline: replacing the previous demo run's {folder}")
        shutil.rmtree(folder)
    dist.barrier()


def stage_train_config(train: TrainConfig, stage: int, pipe: PipelineConfig, shards: dict,
                       start) -> TrainConfig:
    """A demo stage: its data, start and checkpoint folder; the run's other choices. Stage 3
    validates on the held-out split (by default 4 times, covering all of it each time)."""
    work = Path(pipe.work_dir)
    iters = train.train_iters or DEMO_TRAIN_ITERS
    valid = dict(valid_data_path=None, eval_interval=None, eval_iters=None)
    if stage == 3:
        held_out = len(json.loads((work / "data" / "test.json").read_text()))
        valid = dict(valid_data_path=[str(shards["test"])],
                     eval_interval=train.eval_interval or max(1, iters // 4),
                     eval_iters=train.eval_iters or math.ceil(held_out / train.global_batch_size))
    return dataclasses.replace(
        train, stage=stage, train_iters=iters, lr=train.lr or DEMO_LR,
        tokenizer=str(work / "tokenizer"), data_path=[str(shards[f"stage{stage}"])],
        pretrained_checkpoint=str(start), save=str(work / "checkpoints" / f"stage{stage}"),
        **valid)


def evaluate_held_out(pipe: PipelineConfig, tok: Tokenizer) -> Optional[dict]:
    """Stage 3 answers the held-out split (never trained on), scored; with the expert
    activation heatmap. Needs TP=1 process groups; the figures on rank 0 (None elsewhere)."""
    work = Path(pipe.work_dir)
    data, out = work / "data", work / "eval"
    questions, gold = test_questions(data / "test.json", data / "images")
    model, cfg = load_for_inference(work / "checkpoints" / "stage3", ParallelConfig())
    start = time.perf_counter()
    answers = predict(model, questions, gold, tok, GenerationConfig(max_new_tokens=32),
                      out / "predictions.jsonl", out if cfg.moe is not None else None)
    seconds = time.perf_counter() - start
    if answers is None:
        return None
    report = evaluate_predictions(data / "test.json", out / "predictions.jsonl")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(table(report))
    figures = {k: report[k] for k in ("closed_accuracy", "closed_strict_accuracy",
                                      "open_recall", "classification_accuracy", "num_closed",
                                      "num_open")}
    figures["questions_per_s"] = round(len(answers) / seconds, 2)
    log(f"held-out ({len(answers)} questions never trained on, {figures['questions_per_s']} "
        f"questions/s): predictions, report.json and expert_activation.png in {out}")
    return figures


def summarise(losses: dict, accuracy: Optional[float], pipe: PipelineConfig, router_path,
              seconds: float, held_out: Optional[dict]) -> dict:
    log("\n=== summary ===")
    for stage, (first, last) in losses.items():
        log(f"{stage}: loss {first:.4f} -> {last:.4f} "
            f"({'falls' if last < first else 'DOES NOT FALL'})")
    if accuracy is not None:
        log(f"router held-out accuracy: {accuracy:.3f}")
    if held_out is not None:
        pct = {k: "-" if v is None else f"{v:.1f}" for k, v in held_out.items()}
        log(f"stage 3 on the held-out split: closed accuracy {pct['closed_accuracy']} "
            f"(strict {pct['closed_strict_accuracy']}), open recall {pct['open_recall']}, "
            f"modality classification accuracy {pct['classification_accuracy']} (%); "
            f"expert activation: {Path(pipe.work_dir) / 'eval' / 'expert_activation.png'}")
    checkpoints = Path(pipe.work_dir) / "checkpoints"
    log(f"checkpoints: {checkpoints}/stage1, stage2, stage3_init, stage3; router: {router_path}")
    lora = store.read_config(checkpoints / "stage3").lora is not None
    log(f"ask it: python tools/generate.py --load {checkpoints / 'stage3'} --image IMAGE "
        f"--question TEXT; release it: python tools/convert_mcore_to_hf.py --load "
        f"{checkpoints / 'stage3'} --hf-dir RELEASE_DIR"
        + (" --lora-merge (or --peft-adapter-dir ADAPTER_DIR)" if lora else ""))
    log(f"total time: {seconds:.0f} s")
    result = {**losses, "router_accuracy": accuracy, "held_out": held_out}
    log(json.dumps(result))
    return result


def train_demo_router(stage2, router_shards, out, tok, num_experts: int) -> float:
    """The router recipe for `num_experts` experts on the stage-2 model at TP=1 (every rank
    computes the same; rank 0 writes the file). Returns the held-out accuracy."""
    router, report, skipped = train_from_checkpoint(
        stage2, read_shards(shard_paths(router_shards)), tok, num_experts)
    if skipped:
        log(f"router records skipped: {dict(skipped)}")
    if dist.get_rank() == 0:
        router_file.save(router, out)
    dist.barrier()
    log(f"router: {len(report['modalities'])} modalities {report['modalities']} -> experts "
        f"{report['experts']}; held-out modality accuracy {report['modality_accuracy']:.3f}, "
        f"accuracy {report['accuracy']:.3f} per class "
        f"{json.dumps({k: round(v, 3) for k, v in report['per_class'].items()})}")
    return report["accuracy"]
