"""What one training run is asked to do: `TrainConfig`, Megatron-LM's flag names. Every field
is also a flag of examples/pretrain_medmoe.py (training/arguments.py builds them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from medmoe_mcore.config import ConfigError, option
from medmoe_mcore.data.encoding import TEMPLATES

STAGES = (1, 2, 3)


@dataclass
class TrainConfig:
    # Fields marked pipeline=False name a stage's own input and output: the demo pipeline
    # chooses those itself and refuses them.
    stage: Optional[int] = option(None, "train this one stage (1: projector, 2: projector + "
                                  "LLM, 3: experts + meta expert); without it: the whole demo "
                                  "pipeline", choices=STAGES, pipeline=False)
    data_path: Optional[list[str]] = option(
        None, "training data: a folder of tools/prepare_data.py, a weighted blend of them "
        "(`0.75 vqa 0.25 mnist`, Megatron's syntax) or an energon metadataset YAML",
        pipeline=False)
    valid_data_path: Optional[list[str]] = option(
        None, "validation data, the same forms: the loss on it every --eval-interval "
        "iterations", pipeline=False)
    num_workers: int = option(2, "data-loader worker processes per rank (decoding and "
                              "tokenising beside training; with any, the loader runs in a "
                              "helper process per rank); 0 reads in the training process")
    load_data_state: bool = option(True, "resume the data loader where the checkpoint left "
                                   "it; --no-load-data-state starts the data order afresh "
                                   "(the only way to resume at another data-parallel size, "
                                   "worker count or micro-batch size)")
    eval_interval: Optional[int] = option(None, "iterations between validations (default "
                                          "1000, and at the end; needs --valid-data-path)")
    eval_iters: Optional[int] = option(None, "global batches per validation (default 100), "
                                       "the same ones each time, in file order")
    tokenizer: Optional[str] = option(None, "HF tokenizer folder or sentencepiece .model "
                                      "(default: the checkpoint's tokenizer/)", pipeline=False)
    template: Optional[str] = option(None, "prompt template (default: plain for stage 1, phi "
                                     "for stages 2-3)", choices=TEMPLATES, pipeline=False)
    train_iters: Optional[int] = option(None, "iterations (global batches) of the stage "
                                        "(pipeline: per stage, default 200)")
    micro_batch_size: int = option(4, "samples per micro-batch and data-parallel rank")
    global_batch_size: int = option(8, "samples per iteration over all data-parallel ranks "
                                    "(gradient accumulation makes up the rest)")
    seq_length: int = option(128, "maximum tokens per sample, image tokens included")
    lr: Optional[float] = option(None, "peak learning rate (pipeline default 1e-3)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine decay")
    lr_warmup_fraction: float = option(0.03, "fraction of the iterations spent warming up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip_grad: float = option(1.0, "gradient clipping by global norm")
    seed: int = option(1234, "random seed (model init, data order, dropout)")
    save: Optional[str] = option(None, "checkpoint root to save into", pipeline=False)
    load: Optional[str] = option(None, "resume exactly from this run's checkpoint root (model, "
                                 "optimizer, scheduler, RNG, data position)", pipeline=False)
    pretrained_checkpoint: Optional[str] = option(None, "start the stage from these weights "
                                                  "(the previous stage's checkpoint)",
                                                  pipeline=False)
    save_interval: Optional[int] = option(None, "save every N iterations (and at the end)")
    exit_interval: Optional[int] = option(None, "stop (after saving) at this iteration",
                                          pipeline=False)
    log_interval: int = option(10, "iterations per log line and TensorBoard point")
    tensorboard_dir: Optional[str] = option(None, "TensorBoard logs (one subfolder per stage)")
    use_distributed_optimizer: bool = option(False, "shard optimizer state over data-parallel "
                                             "ranks (Megatron's distributed optimizer)")
    train_projector: bool = option(True, "stage 3 also trains the projector (the authors' "
                                   "name filter does)")
    bf16: bool = option(False, "train in bfloat16 (parameters and activations)")
    recompute_granularity: Optional[Literal["full", "selective"]] = option(
        None, "activation recomputation to save memory")

    def validate(self, dp: int) -> "TrainConfig":
        if self.stage not in STAGES:
            raise ConfigError(f"--stage {self.stage}: must be one of {STAGES}")
        missing = [flag for flag, value in (("--data-path", self.data_path),
                                            ("--train-iters", self.train_iters),
                                            ("--lr", self.lr)) if value is None]
        if self.load is None and self.pretrained_checkpoint is None:
            missing.append("--load or --pretrained-checkpoint")
        if missing:
            raise ConfigError(f"--stage {self.stage} needs {', '.join(missing)}")
        if self.valid_data_path is None:
            asked = [f for f, v in (("--eval-interval", self.eval_interval),
                                    ("--eval-iters", self.eval_iters)) if v is not None]
            if asked:
                raise ConfigError(f"{', '.join(asked)} without --valid-data-path: there is no "
                                  "validation data to evaluate")
        for flag, value in (("--eval-interval", self.eval_interval),
                            ("--eval-iters", self.eval_iters)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: must be a positive integer")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers {self.num_workers}: must be 0 or more")
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not divisible by "
                              f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                              f"{dp}")
        return self

    @property
    def validation(self) -> Optional[tuple[int, int]]:
        """(eval interval, eval iters) with Megatron-LM's defaults, or None without data."""
        if self.valid_data_path is None:
            return None
        return self.eval_interval or 1000, self.eval_iters or 100

    @property
    def template_or_default(self) -> str:
        return self.template or ("plain" if self.stage == 1 else "phi")
