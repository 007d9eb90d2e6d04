"""Where rank 0's training scalars go: TensorBoard (--tensorboard-dir, a subfolder per stage)
and Weights & Biases (--wandb-project, Megatron-LM's flags; one W&B run per stage, named
`<--wandb-exp-name>-stage<N>` and grouped under the experiment name). Every sink gets the same
names at the same iterations; W&B also gets the run's configuration once, at its start.

W&B runs wherever its own settings say (`WANDB_MODE=offline` writes the run under
--wandb-save-dir for a later `wandb sync`; nothing here needs a network)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class TensorBoardSink:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def scalars(self, values: dict, iteration: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, name: str, group: str, folder: Optional[str],
                 config: dict):
        import wandb

        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project, name=name, group=group, dir=folder,
                                  config=config)
        except Exception as e:  # wandb's own errors name no flag
            raise RuntimeError(f"--wandb-project {project}: W&B could not start a run ({e}); "
                               "without a W&B login set WANDB_MODE=offline (the run is kept "
                               "under --wandb-save-dir for `wandb sync`)") from e

    def scalars(self, values: dict, iteration: int) -> None:
        self.run.log(values, step=iteration)

    def close(self) -> None:
        self.run.finish()


def open_sinks(train, config: dict) -> list:
    """The sinks a TrainConfig asks for (rank 0 calls this; other ranks log nowhere)."""
    stage = f"stage{train.stage}" if train.stage is not None else ""
    sinks = []
    if train.tensorboard_dir:
        sinks.append(TensorBoardSink(Path(train.tensorboard_dir) / stage))
    if train.wandb_project:
        folder = train.wandb_save_dir or (str(Path(train.save) / "wandb") if train.save
                                          else None)
        sinks.append(WandbSink(train.wandb_project,
                               "-".join(x for x in (train.wandb_exp_name, stage) if x),
                               train.wandb_exp_name, folder, config))
    return sinks
