"""Everything a stage trains with, built from the configs in the process groups the entry
point created: the stage's model config (the checkpoint's, with this run's layout and
precision), the model with its stage's trainable set, Megatron DDP, the Megatron optimizer and
the cosine schedule."""

from __future__ import annotations

import contextlib

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.model import ModelConfig, ParallelConfig
from medmoe_mcore.models.medmoe import build_model
from medmoe_mcore.models.specs.backends import announce
from medmoe_mcore.runtime import parallel
from medmoe_mcore.training.config import TrainConfig
from medmoe_mcore.training.freezing import apply_stage


def stage_config(source, par: ParallelConfig, train: TrainConfig) -> ModelConfig:
    """The checkpoint's model with this run's layout and precision choices."""
    cfg = store.read_config(source, par)
    limit = cfg.language.max_position_embeddings
    if train.seq_length > limit:  # as Megatron-LM's argument check
        raise ConfigError(f"--seq-length {train.seq_length} exceeds the model's "
                          f"max_position_embeddings {limit} ({source}): positions past it were "
                          "never trained and HF exports declare the model's limit")
    if train.bf16:
        cfg.params_dtype = "bfloat16"
    cfg.recompute_granularity = "selective" if train.recompute_activations else \
        train.recompute_granularity
    cfg.recompute_method, cfg.recompute_num_layers = train.recompute_method, \
        train.recompute_num_layers
    cfg.calculate_per_token_loss = train.calculate_per_token_loss
    if train.moe_expert_capacity_factor is not None:
        cfg.moe_capacity = (train.moe_expert_capacity_factor, train.moe_token_drop_policy,
                            train.moe_pad_expert_input_to_capacity)
        cfg.validate()
    return cfg


@dataclass
class TrainingSetup:
    model: torch.nn.Module  # the bare model (checkpoints are its sharded state)
    ddp: DistributedDataParallel
    optimizer: object  # Megatron's MegatronOptimizer
    scheduler: OptimizerParamScheduler
    trainable: list[str]


def stage_model(cfg: ModelConfig, train: TrainConfig) -> tuple[torch.nn.Module, list[str]]:
    """The model on this rank's device with the stage's trainable set (names returned)."""
    parallel.log(announce(cfg.parallel.transformer_impl))
    model = build_model(cfg).to(parallel.device())
    trainable = apply_stage(model, train.stage, train.train_projector,
                            cfg.moe is not None and cfg.moe.router_type == "learned",
                            lora=cfg.lora is not None)
    return model, trainable


def wrap(model: torch.nn.Module, trainable: list[str], cfg: ModelConfig,
         train: TrainConfig) -> TrainingSetup:
    """DDP, optimizer and schedule around a model whose starting weights are loaded."""
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=train.use_distributed_optimizer,
            overlap_grad_reduce=train.overlap_grad_reduce,
            overlap_param_gather=train.overlap_param_gather,
            bucket_size=train.ddp_bucket_size, grad_reduce_in_fp32=True), model)
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    flags = train.run_flags()
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer=train.optimizer, lr=train.lr, min_lr=train.min_lr,
        weight_decay=train.weight_decay, adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2, adam_eps=train.adam_eps, sgd_momentum=train.sgd_momentum,
        clip_grad=train.clip_grad, bf16=cfg.params_dtype == "bfloat16",
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=train.use_distributed_optimizer), [ddp])
    # A resumed schedule that differs from these flags was refused before the model was
    # built (training/resume.py) unless one of Megatron's two flags says which wins.
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=flags["init_lr"], **train.schedule(), start_wd=0.0, end_wd=0.0,
        wsd_decay_steps=flags["wsd_decay_steps"], lr_wsd_decay_style=flags["lr_wsd_decay_style"],
        wd_incr_steps=train.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=train.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=train.override_opt_param_scheduler)
    return TrainingSetup(model, ddp, optimizer, scheduler, trainable)


@contextlib.contextmanager
def params_in_sync(ddp: DistributedDataParallel):
    """Every parameter current on this rank while the block runs (a save, an evaluation):
    with --overlap-param-gather the distributed optimizer's updated shards otherwise reach the
    other ranks only during the next training forward pass (Megatron-LM's training loop does
    the same around its saves and evaluations)."""
    if not ddp.use_forward_hook:
        yield
        return
    ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()


def token_step(setup: TrainingSetup, tokens: torch.Tensor, positions: torch.Tensor):
    """One optimizer step of a language model on token ids as their own labels (the
    benchmarks' step: no data loader, no schedule); returns the mean loss."""
    setup.ddp.zero_grad_buffer()
    setup.optimizer.zero_grad()
    loss = setup.ddp(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    finalize_model_grads([setup.ddp])
    setup.optimizer.step()
    return loss.detach()
