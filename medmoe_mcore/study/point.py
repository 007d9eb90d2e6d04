"""One point of a scaling study, in three phases, each in the process groups its entry point
(tools/scaling_study.py) makes for it: `prepare` (TP = EP = 1: the router of its expert count
trained on the stage-2 model, then upcycling), `train` (the point's layout: N stage-3
iterations measured), `score` (TP = EP = 1: the test questions answered and scored, when a test
file is given). `write_result` puts everything in the point's result.json, which marks it done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from medmoe_mcore.config.model import ParallelConfig
from medmoe_mcore.conversion.upcycle import upcycle
from medmoe_mcore.data.records import read_shards, shard_paths
from medmoe_mcore.router import file as router_file
from medmoe_mcore.router.training import train_from_checkpoint
from medmoe_mcore.runtime.parallel import is_rank0, log
from medmoe_mcore.models import parameters
from medmoe_mcore.study.grid import Point, StudyConfig, point_dir
from medmoe_mcore.training.config import TrainConfig

RESULT = "result.json"


def is_done(study: StudyConfig, point: Point) -> bool:
    return (point_dir(study, point) / RESULT).is_file()


def prepare(study: StudyConfig, point: Point, stage2, tok) -> tuple[Path, dict]:
    """(the point's upcycled stage-3 start, router report or {}); overwrites an unfinished
    point's earlier attempt (a finished one is never prepared again)."""
    folder = point_dir(study, point)
    if is_rank0() and (folder / "stage3").exists():  # an unfinished earlier attempt's
        shutil.rmtree(folder / "stage3")
    dist.barrier()
    router_path, report = None, {}
    if point.router_type == "modality":  # --router-data-path was checked by the entry point
        router, report, _ = train_from_checkpoint(
            stage2, read_shards(shard_paths(study.router_data_path)), tok, point.num_experts)
        router_path = folder / "router.safetensors"
        if is_rank0():
            folder.mkdir(parents=True, exist_ok=True)
            router_file.save(router, router_path)
        dist.barrier()
        log(f"{point.name}: router experts {report['experts']}, held-out accuracy "
            f"{report['accuracy']:.3f} (modality {report['modality_accuracy']:.3f})")
    start = folder / "stage3_init"
    upcycle(stage2, start, point.moe(), router_path=router_path, overwrite=True)
    return start, report


def train(point: Point, cfg, train_config: TrainConfig) -> dict:
    """N stage-3 iterations at the point's layout; its cost, load and loss figures (the same
    on every rank; the memory figure is gathered from all)."""
    from medmoe_mcore.training.trainer import Trainer

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, train_config)
    trainer.run()
    counted = parameters.counted(trainer.model, cfg) \
        if cfg.parallel.tensor_model_parallel_size == 1 else None
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    measured = trainer.steps[min(2, len(trainer.steps) - 1):]  # the first steps warm up
    seconds = statistics.median(s for s, _ in measured)
    tokens = statistics.median(t for _, t in measured)
    windows = trainer.expert_windows
    load = torch.stack(windows).sum(0) if windows else None
    return {
        "losses": trainer.losses,
        "validation": trainer.validation_losses,
        "step_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": peaks,
        "peak_memory_kind": "cuda max allocated" if torch.cuda.is_available() else
                            "process peak RSS",
        "expert_tokens": load.tolist() if load is not None else None,
        "expert_balance": balance(load, point.ep, windows) if load is not None else None,
        "counted_parameters": counted,
    }


def _per_rank(tokens: torch.Tensor, ep: int) -> torch.Tensor:
    """[layer, EP rank]: experts are laid out in contiguous blocks of E/EP per rank."""
    return tokens.double().reshape(tokens.shape[0], ep, -1).sum(-1)


def _ratio(x: torch.Tensor) -> torch.Tensor:
    return x.max(-1).values / x.mean(-1).clamp(min=1e-9)


def balance(expert_tokens: torch.Tensor, ep: int, windows=()) -> dict:
    """max/mean tokens per expert and per EP rank over the run (worst MoE layer, mean over
    layers); with the log windows (one per step at --log-interval 1), the same per EP rank in
    each window, averaged: what a step waits for."""
    def summary(r):
        return {"worst_layer": round(r.max().item(), 3), "mean": round(r.mean().item(), 3)}

    out = {"per_expert_max_over_mean": summary(_ratio(expert_tokens.double())),
           "per_ep_rank_max_over_mean": summary(_ratio(_per_rank(expert_tokens, ep)))}
    if len(windows):
        steps = torch.stack([_ratio(_per_rank(w, ep)).mean() for w in windows])
        out["per_window_ep_rank_max_over_mean"] = round(steps.mean().item(), 3)
    return out


def score(study: StudyConfig, point: Point, tok) -> dict | None:
    """The point's stage-3 checkpoint answers the test file, scored (rank 0; None elsewhere
    and without a test file)."""
    from medmoe_mcore.eval.predict import predict, test_questions
    from medmoe_mcore.eval.scoring import evaluate_predictions
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.inference.engine import load_for_inference

    if study.test_data is None:
        return None
    out = point_dir(study, point) / "eval"
    questions, gold = test_questions(study.test_data, study.image_folder)
    model, _ = load_for_inference(point_dir(study, point) / "stage3", ParallelConfig())
    answers = predict(model, questions, gold, tok, GenerationConfig(max_new_tokens=32),
                      out / "predictions.jsonl")
    if answers is None:
        return None
    report = evaluate_predictions(study.test_data, out / "predictions.jsonl")
    return {k: report[k] for k in ("closed_accuracy", "open_recall", "classification_accuracy",
                                   "num_closed", "num_open")}


def write_result(study: StudyConfig, point: Point, cfg, measured: dict, router: dict,
                 scores: dict | None, train_config: TrainConfig) -> dict:
    """result.json (rank 0, atomically): the point, its parameters (formula, checked against
    the built model's count at TP = 1), cost, load, losses, router and scores."""
    expected = parameters.expected(cfg)
    counted = measured.pop("counted_parameters")
    if counted is not None and counted != expected:
        raise AssertionError(f"{point.name}: parameters counted {counted} != formula "
                             f"{expected} (medmoe_mcore/models/parameters.py)")
    result = {
        "point": point.name, **dataclasses.asdict(point),
        "parameters": expected, "parameters_checked_on_model": counted is not None,
        **measured,
        "router": {k: router[k] for k in ("accuracy", "modality_accuracy", "experts")
                   if k in router},
        "scores": scores,
        "train_iters": train_config.train_iters,
        "global_batch_size": train_config.global_batch_size,
        "seq_length": train_config.seq_length,
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
    }
    if is_rank0():
        path = point_dir(study, point) / RESULT
        tmp = path.with_name(RESULT + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
    dist.barrier()
    return result
