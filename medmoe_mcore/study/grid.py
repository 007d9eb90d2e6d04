"""A scaling study's grid: the sweep axes (each a flag of tools/scaling_study.py taking one or
more values, Megatron-LM's names), the inputs every point shares, and the points."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from medmoe_mcore.config.fields import ConfigError, option
from medmoe_mcore.config.model import LanguageConfig, MoEConfig, ParallelConfig
from medmoe_mcore.demo import dataset

# sweep axes whose values are words: the words each accepts
SWEEP_CHOICES = {"moe_router_type": ("modality", "learned"), "moe_meta_expert": ("on", "off")}


@dataclass
class StudyConfig:
    study_dir: str = option("scaling_study", "the study's folder: one subfolder per point "
                            "(router, checkpoints, TensorBoard, result.json), the CSV, JSON, "
                            "plots and table")
    num_experts: list[int] = option((2, 4), "expert counts to sweep", flag="--num-experts")
    moe_router_topk: list[int] = option((1, 2), "top-k values to sweep")
    moe_router_type: list[str] = option(("modality",), "router types to sweep (modality, "
                                        "learned)")
    moe_meta_expert: list[str] = option(("on",), "meta expert on and/or off")
    expert_model_parallel_size: list[int] = option((1,), "expert-parallel sizes to sweep (the "
                                                   "number of processes must be a multiple)")
    router_data_path: Optional[str] = option(None, "labelled shards (with `modality`) the "
                                             "modality router of each expert count is "
                                             "trained on")
    test_data: Optional[str] = option(None, "Med-VQA / MedMNIST test file (LLaVA JSON) each "
                                      "point answers and is scored on (tools/evaluate.py's "
                                      "scorer); without it, the validation loss is the score")
    image_folder: Optional[str] = option(None, "images of --test-data")
    demo_dir: Optional[str] = option(None, "the main job's work folder (medmoe_demo): its "
                                     "stage-2 checkpoint, stage-3 data, held-out split and "
                                     "router data fill every input not given")


@dataclass(frozen=True)
class Point:
    num_experts: int
    topk: int
    router_type: str
    meta_expert: bool
    ep: int

    @property
    def name(self) -> str:
        return (f"E{self.num_experts}-top{self.topk}-{self.router_type}-"
                f"{'meta' if self.meta_expert else 'nometa'}-ep{self.ep}")

    def moe(self) -> MoEConfig:
        """The point's MoE layers; top-2 renormalised (the authors' rule; Megatron's learned
        router needs top-1 not renormalised)."""
        return MoEConfig.from_choices(dict(
            num_experts=self.num_experts, router_topk=self.topk, router_type=self.router_type,
            meta_expert=self.meta_expert, renormalize=self.topk >= 2))

    def parallel(self, base: ParallelConfig) -> ParallelConfig:
        return dataclasses.replace(base, expert_model_parallel_size=self.ep)


def points(study: StudyConfig, language: LanguageConfig) -> tuple[list[Point], list[str]]:
    """(valid points, one line per left-out combination saying why): a top-k above the expert
    count or an EP size that does not divide it is left out, not failed."""
    for name, allowed in SWEEP_CHOICES.items():
        bad = [v for v in getattr(study, name) if v not in allowed]
        if bad:
            raise ConfigError(f"--{name.replace('_', '-')} {' '.join(bad)}: each value must be "
                              f"one of {', '.join(allowed)}")
    grid, left_out = [], []
    for e, k, router, meta, ep in itertools.product(
            study.num_experts, study.moe_router_topk, study.moe_router_type,
            study.moe_meta_expert, study.expert_model_parallel_size):
        point = Point(e, k, router, meta == "on", ep)
        try:
            moe = point.moe()
            moe.validate(language)
            point.parallel(ParallelConfig()).validate_experts(language, moe)
        except ConfigError as err:
            left_out.append(f"{point.name}: {err}")
            continue
        grid.append(point)
    if not grid:
        raise ConfigError("the sweep has no valid point:\n  " + "\n  ".join(left_out))
    return grid, left_out


def point_dir(study: StudyConfig, point: Point) -> Path:
    return Path(study.study_dir) / "points" / point.name


def demo_inputs(demo_dir: str) -> dict:
    """The main job's folder as the study's inputs (TrainConfig and StudyConfig fields)."""
    work = Path(demo_dir)
    shards = dataset.shard_folders(work / "data")
    return {"pretrained_checkpoint": str(work / "checkpoints" / "stage2"),
            "data_path": [str(shards["stage3"])],
            "valid_data_path": [str(shards["test"])],
            "router_data_path": str(shards["router"]),
            "test_data": str(work / "data" / "test.json"),
            "image_folder": str(work / "data" / "images")}
