"""The model's training history, carried in every checkpoint (`training_stages.json`, one
entry per stage, the stages before this one carried along from the checkpoint it started
from): what a release's model card reports (conversion/model_card.py). A later save of the same
stage replaces that stage's entry."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path


def stage_entry(train, iteration: int, consumed_samples: int, datasets: list) -> dict:
    """One stage as the card shows it: its schedule, optimizer, batch and data (dataset folder
    names and weights: paths stay on the machine that trained)."""
    schedule = train.schedule()
    return dict(
        stage=train.stage, iterations=iteration, consumed_samples=consumed_samples,
        global_batch_size=train.global_batch_size, micro_batch_size=train.micro_batch_size,
        seq_length=train.seq_length, lr=train.lr, min_lr=train.min_lr,
        lr_decay_style=train.lr_decay_style, lr_warmup_iters=schedule["lr_warmup_steps"],
        lr_decay_iters=schedule["lr_decay_steps"], weight_decay=train.weight_decay,
        clip_grad=train.clip_grad, optimizer=train.optimizer,
        adam_betas=[train.adam_beta1, train.adam_beta2] if train.optimizer == "adam" else None,
        precision="bf16" if train.bf16 else "float32",
        datasets=[[Path(path).name, 1.0 if weight is None else weight]
                  for path, weight in datasets],
        saved=datetime.now(timezone.utc).strftime("%Y-%m-%d"))


def updated(carried_text: str | None, entry: dict) -> str:
    """The history text with `entry` in its stage's place (later stages dropped: a stage
    retrained starts a new line of descent)."""
    stages = json.loads(carried_text) if carried_text else []
    stages = [s for s in stages if s["stage"] < entry["stage"]] + [entry]
    return json.dumps(stages, indent=2)
