"""One training stage on Megatron-Core: the loop. Set-up (training/setup.py), checkpoint state
(training/resume.py) and logs (training/metrics.py) are components; process groups are the
entry point's (runtime.parallel.initialize), created before a Trainer.

No argv here: examples/pretrain_medmoe.py builds `TrainConfig` from its flags.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.data.blend import data_blend
from medmoe_mcore.data.loader import MedMoETaskEncoder, training_batches, validation_batches
from medmoe_mcore.models.flops import spliced_length, training_flops
from medmoe_mcore.models.moe.stats import ExpertActivation
from medmoe_mcore.runtime import parallel
from medmoe_mcore.runtime.parallel import log
from medmoe_mcore.training import setup as training_setup
from medmoe_mcore.training.config import TrainConfig
from medmoe_mcore.training.exits import ExitConditions
from medmoe_mcore.training.manual_gc import ManualGC
from medmoe_mcore.training.metrics import TrainingMetrics, params_norm
from medmoe_mcore.training.resume import RunCheckpoint, rng_state, set_rng_state


class TrainingStopped(RuntimeError):
    """The run cannot go on without losing or corrupting work (said with the iteration)."""


class RunExited(Exception):
    """The run stopped early as asked (a signal, the duration; training/exits.py), its
    checkpoint saved: not an error. Carries the reason and the losses of the iterations run."""

    def __init__(self, reason: str, losses: list[float]):
        super().__init__(reason)
        self.reason, self.losses = reason, losses


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Collective: every rank's tensors are all finite."""
    ok = torch.tensor([all(bool(torch.isfinite(t).all()) for t in tensors)],
                      dtype=torch.int32, device=parallel.device())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class StepResult(NamedTuple):
    loss: float  # mean over the global batch (all data-parallel ranks)
    grad_norm: float  # NaN when the step was skipped
    lr: float
    tokens: int  # tokens this rank processed
    skipped: bool  # non-finite loss or gradients: no update
    data_seconds: float  # waiting for this rank's micro-batches
    flops: int = 0  # model FLOPs of this rank's micro-batches (models/flops.py)


class Trainer:
    def __init__(self, cfg: ModelConfig, train: TrainConfig):
        self.cfg, self.train = cfg, train
        self.dp = parallel_state.get_data_parallel_world_size()
        train.validate(self.dp)
        cfg.validate()
        # caught from here on: a signal while the model is built or loaded stops the run after
        # its first iteration (with a checkpoint), not halfway through the set-up
        self.exits = ExitConditions(train.exit_signal_handler, train.exit_signal,
                                    train.exit_duration_in_mins)
        # the data is resolved and every dataset checked before the model is built
        blend = data_blend(train.data_path)
        encoder = MedMoETaskEncoder(
            train.tokenizer, train.template_or_default, train.seq_length, cfg,
            balance_micro_batch=train.micro_batch_size if train.balanced_modality_batches else 0,
            pack=train.pack_sequences)
        self.blend = blend
        self.data = training_batches(blend, encoder, train.micro_batch_size, *self._dp_layout())
        log(f"data: {blend.summary()}; {train.template_or_default} template, "
            f"{train.num_workers} loader workers per rank"
            f"{'; modality-balanced micro-batches' if train.balanced_modality_batches else ''}"
            f"{'; packed sequences of up to --seq-length tokens' if train.pack_sequences else ''}")
        self.valid = None
        if train.validation:
            valid = data_blend(train.valid_data_path, "--valid-data-path")
            interval, iters = train.validation
            repeats = iters * train.global_batch_size > valid.samples
            log(f"validation data: {valid.summary()}; every {interval} iterations and at the "
                f"end: {iters} global batches of {train.global_batch_size}"
                f"{' (more than the data: samples repeat)' if repeats else ''}")
            self.valid = validation_batches(valid, MedMoETaskEncoder(
                encoder.tok, train.template_or_default, train.seq_length, cfg, train=False),
                train.micro_batch_size, *self._dp_layout())
        self.checkpoint = RunCheckpoint(cfg, train, dict(
            datasets=blend.identity(), data_parallel_size=self.dp,
            num_workers=train.num_workers, micro_batch_size=train.micro_batch_size,
            balanced_modality_batches=train.balanced_modality_batches,
            pack_sequences=train.pack_sequences))
        model, trainable = training_setup.stage_model(cfg, train)
        self.checkpoint.load_starting_weights(model)
        self.setup = training_setup.wrap(model, trainable, cfg, train)
        self.progress = self.checkpoint.restore(self.setup, self.data)
        self.metrics = TrainingMetrics(
            train, self.dp, dict(train=dataclasses.asdict(train), model=dataclasses.asdict(cfg)),
            parallel_state.get_data_parallel_group())
        # expert load per layer to the logs, as Megatron's MoE metrics (every rank counts)
        self.expert_load = ExpertActivation(model, ["-"]) \
            if cfg.moe is not None and (train.tensorboard_dir or train.wandb_project) else None
        self.losses: list[float] = []
        # what a study of the run reads after it (tools/scaling_study.py): each step's
        # (seconds, tokens of all data-parallel ranks), (iteration, validation loss) pairs,
        # routed tokens [layer, expert] of each log window (every rank's, padding left out)
        self.steps: list[tuple[float, int]] = []
        self.validation_losses: list[tuple[int, float]] = []
        self.expert_windows: list[torch.Tensor] = []

    def _dp_layout(self) -> tuple:
        return (parallel_state.get_data_parallel_rank(), self.dp, self.train.num_workers,
                self.train.seed)

    @property
    def model(self):
        return self.setup.model

    @property
    def iteration(self) -> int:
        return self.progress.iteration

    def save(self):
        """A checkpoint of now, unless a parameter is not finite: such a state is never
        written (nor marked latest); the run stops instead."""
        if not _all_finite([p.detach() for p in self.model.parameters()]):
            bad = [n for n, p in self.model.named_parameters()
                   if not torch.isfinite(p.detach()).all()]
            raise TrainingStopped(
                f"iteration {self.iteration}: not saving: parameters hold non-finite values "
                f"({', '.join(bad[:3]) or 'on another rank'}); the last checkpoint stays "
                "the latest")
        with training_setup.params_in_sync(self.setup.ddp):
            return self.checkpoint.save(self.setup, self.progress, self.data)

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        dev = parallel.device()
        images = batch["images"].to(dev, self.model.config.params_dtype) \
            if batch["images"] is not None else None
        counting = self.expert_load is not None and torch.is_grad_enabled()  # not validation
        if counting:
            par = self.cfg.parallel
            self.expert_load.begin_batch(
                batch["input_ids"], batch["lengths"], ["-"] * len(batch["lengths"]),
                par.tensor_model_parallel_size if par.sequence_parallel else 1)
        packed = batch.get("sample_index")
        loss, mask = model(batch["input_ids"].to(dev), images, labels=batch["labels"].to(dev),
                           **({} if packed is None else {"sample_index": packed.to(dev)}))
        if counting:
            self.expert_load.end_batch()

        def loss_func(output):
            per_token, m = output
            m = m.float()
            total, count = (per_token.float() * m).sum(), m.sum()
            if self.train.calculate_per_token_loss:
                # Megatron's form: (sum, tokens, report); finalize_model_grads divides the
                # gradients by the global batch's token count
                return total, count.int(), {"lm loss": torch.stack([total, count]).detach()}
            value = total / count.clamp(min=1)
            # a copy: the schedule divides the returned loss in place by the micro-batch count
            return value, {"lm loss": value.detach().clone()}

        return (loss, mask), loss_func

    def _losses(self, micro: list[dict], forward_only: bool) -> list[torch.Tensor]:
        """Each micro-batch's mean token loss, through Megatron's schedule."""
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(micro),
            model=[self.setup.ddp], num_microbatches=len(micro),
            seq_length=self.train.seq_length, micro_batch_size=self.train.micro_batch_size,
            forward_only=forward_only)
        return [x["lm loss"] for x in losses]

    @property
    def _micro_per_step(self) -> int:
        return self.train.global_batch_size // (self.dp * self.train.micro_batch_size)

    def _mean_over_dp(self, losses: list[torch.Tensor]) -> float:
        """The global batch's loss: the mean of the micro-batches' means, or with
        --calculate-per-token-loss the mean over all their tokens."""
        group = parallel_state.get_data_parallel_group()
        if self.train.calculate_per_token_loss:
            total = torch.stack(losses).sum(dim=0)
            dist.all_reduce(total, group=group)
            return (total[0] / total[1].clamp(min=1)).item()
        loss = torch.stack(losses).mean()
        dist.all_reduce(loss, group=group)
        return (loss / self.dp).item()

    def evaluate(self) -> float:
        """Mean validation loss over the same `eval_iters` global batches every time. Nothing
        of the training state changes: no gradient, and every RNG is put back."""
        s, (_, iters) = self.setup, self.train.validation
        rng = rng_state()
        s.ddp.eval()
        try:
            with torch.no_grad(), training_setup.params_in_sync(s.ddp):
                micro = self.valid.micro_batches(iters * self._micro_per_step)
                losses = [x for i in range(0, len(micro), self._micro_per_step)
                          for x in self._losses(micro[i:i + self._micro_per_step], True)]
        finally:
            s.ddp.train()
            set_rng_state(rng)
        return self._mean_over_dp(losses)

    def step(self) -> StepResult:
        """One global batch."""
        s, p = self.setup, self.progress
        start = time.perf_counter()
        micro = [self.data.next() for _ in range(self._micro_per_step)]
        data_seconds = time.perf_counter() - start
        tokens = sum(int(b["input_ids"].numel()) for b in micro)
        flops = sum(self._flops(b) for b in micro) if self.train.log_throughput else 0
        s.ddp.zero_grad_buffer()
        s.optimizer.zero_grad()
        loss = self._mean_over_dp(self._losses(micro, forward_only=False))
        grad_norm, skipped = float("nan"), True
        # Megatron's fp32 optimizer would apply non-finite gradients (its clipping compares
        # NaN): no update unless the loss and every rank's reduced gradients are finite
        buffers = [b.grad_data for b in (*s.ddp.buffers, *s.ddp.expert_parallel_buffers)]
        if math.isfinite(loss) and _all_finite(buffers):
            ok, norm, _ = s.optimizer.step()
            skipped = not ok
            grad_norm = norm if norm is not None else float("nan")
        lr = s.optimizer.param_groups[0]["lr"]
        s.scheduler.step(increment=1)
        p.iteration += 1
        p.consumed_samples += self.train.global_batch_size
        return StepResult(loss, grad_norm, lr, tokens, skipped, data_seconds, flops)

    def _flops(self, batch: dict) -> int:
        """Model FLOPs of one micro-batch, from its shapes (models/flops.py)."""
        cfg, ids = self.cfg, batch["input_ids"]
        if cfg.vision is None:
            return training_flops(cfg, ids.shape[0], ids.shape[1], 0)
        par = cfg.parallel
        length = spliced_length(ids, cfg.vision.image_token_id, cfg.vision.num_patches,
                                par.tensor_model_parallel_size if par.sequence_parallel else 1)
        images = 0 if batch["images"] is None else batch["images"].shape[0]
        return training_flops(cfg, ids.shape[0], length, images)

    def _report_data(self) -> None:
        """Samples read per dataset and records skipped while encoding, over all data-parallel
        ranks, for this run (since its start or resume)."""
        mine = (self.data.read_per_dataset(), dict(self.data.skipped()))
        everyone = [None] * self.dp
        dist.all_gather_object(everyone, mine, group=parallel_state.get_data_parallel_group())
        drawn = [sum(x) for x in zip(*(d for d, _ in everyone))]
        total = max(sum(drawn), 1)
        log("data read this run: " + " | ".join(
            f"{d.name} {n} samples ({n / total:.1%})"
            for d, n in zip(self.blend.datasets, drawn)))
        skipped = sum((Counter(s) for _, s in everyone), Counter())
        if skipped:
            log(f"data: skipped {sum(skipped.values())} records while encoding (by reason: "
                f"{dict(skipped)})")

    def run(self) -> list[float]:
        """The stage's iterations; the loaders and the logs are closed however it ends (a
        stopped run keeps its TensorBoard points)."""
        try:
            exited = self._iterate()
            self.checkpoint.finish_saves(wait=True)  # every save complete before the end
            self._report_data()
        finally:
            self.checkpoint.close()
            self.exits.close()
            self.data.close()
            if self.valid is not None:
                self.valid.close()
            self.metrics.close()
        if exited:
            raise RunExited(exited, self.losses)
        return self.losses

    def _iterate(self) -> str | None:
        """The iterations; the reason the run stopped early as asked, if it did."""
        t = self.train
        collector = ManualGC(t.manual_gc, t.manual_gc_interval, t.manual_gc_eval)
        try:
            return self._loop(collector)
        finally:
            collector.close()

    def _loop(self, collector: ManualGC) -> str | None:
        t = self.train
        saved, non_finite = False, []
        self.metrics.start_window()
        while self.progress.iteration < t.train_iters:
            start = time.perf_counter()
            result = self.step()
            self.steps.append((time.perf_counter() - start, result.tokens * self.dp))
            self.losses.append(result.loss)
            it = self.progress.iteration
            collector.step(it)
            norm = params_norm(self.model) \
                if t.log_params_norm and self.metrics.is_log_iteration(it) else None
            if self.metrics.record(it, self.progress.consumed_samples, result, norm) and \
                    self.expert_load is not None:
                counts = self.expert_load.reduce()
                self.metrics.expert_load(it, counts, self.expert_load.layer_numbers)
                self.expert_windows.append(counts[:, :, 1:].sum(dim=(1, 2)))
                self.expert_load.counts.zero_()
            non_finite = non_finite + [it] if result.skipped else []  # skipped: not finite
            if t.check_for_nan_in_loss_and_grad and len(non_finite) >= t.max_nan_iterations:
                raise TrainingStopped(
                    f"iterations {non_finite[0]}-{it}: {len(non_finite)} consecutive iterations "
                    f"with a non-finite loss or gradient norm (--max-nan-iterations "
                    f"{t.max_nan_iterations}); each was skipped (no update). Lower --lr, check "
                    "the data, or resume from the last checkpoint")
            if self.valid and (it % self.train.validation[0] == 0 or it == t.train_iters):
                start = time.time()
                loss = self.evaluate()
                self.validation_losses.append((it, loss))
                collector.evaluated()
                self.metrics.validation(it, loss, time.time() - start)
            saved = bool(t.save and t.save_interval and it % t.save_interval == 0)
            if saved:
                self.save()
            self.checkpoint.finish_saves()  # background saves whose files are written
            if t.exit_interval and it % t.exit_interval == 0:
                if t.save and not saved:  # exiting never loses the work done
                    self.save()
                log(f"exiting at iteration {it} (--exit-interval)")
                break
            reason = self.exits.check()
            if reason:
                if not saved:
                    self.save()
                log(f"exiting at iteration {it}: {reason}; the checkpoint in {t.save} resumes "
                    "the run (--load)")
                return reason
        else:  # (a resumed run that had nothing left to do saves nothing)
            if t.save and not saved and self.iteration > self.checkpoint.start_iteration:
                self.save()
