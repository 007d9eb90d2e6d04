"""Med-MoE training on Megatron-Core: one stage, or (no --stage) the whole demo pipeline.

    # the embedded demo: stage 1 -> stage 2 -> router -> upcycling -> stage 3 (tiny, CPU)
    torchrun --nproc_per_node 2 examples/pretrain_medmoe.py

    # one stage on your data (Megatron-LM flag names)
    torchrun --nproc_per_node 8 examples/pretrain_medmoe.py --stage 2 \\
        --pretrained-checkpoint CKPT_STAGE1 --data-path SHARDS --tokenizer TOK \\
        --tensor-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 128 \\
        --lr 2e-5 --min-lr 0 --lr-warmup-fraction 0.03 --train-iters 1400 --seq-length 2048 \\
        --save CKPT_STAGE2 --save-interval 200 --bf16 --tensorboard-dir TB

    # stage 3 on LoRA adapters (the paper's Med-LoRAMoE; base weights frozen)
    torchrun --nproc_per_node 8 examples/pretrain_medmoe.py --stage 3 --lora-rank 128 \\
        --pretrained-checkpoint CKPT_STAGE3_INIT --data-path SHARDS --lr 2e-4 ...

`--load DIR` resumes exactly when DIR holds a checkpoint of this run (model, optimizer,
scheduler, RNG, data position); `--pretrained-checkpoint` starts a stage from weights only.
A stage run takes the model's shape and MoE layout from its checkpoint: a model-shape or MoE
flag that contradicts it stops the run before anything is built. Every flag is generated from
the config dataclasses (medmoe_mcore/training/arguments.py).
"""

import argparse
import os
import sys
import time


def parser() -> argparse.ArgumentParser:
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.config.model import MoEConfig, ParallelConfig
    from medmoe_mcore.demo.pipeline import PipelineConfig
    from medmoe_mcore.training.arguments import add_config_arguments
    from medmoe_mcore.training.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arguments(p, TrainConfig, "training (Megatron-LM flags)")
    add_config_arguments(p, ParallelConfig, "parallelism")
    add_config_arguments(p, MoEConfig, "Med-MoE layers (the pipeline's upcycling; with --stage "
                                       "3 they must agree with the checkpoint)")
    add_config_arguments(p, LoRAConfig, "LoRA (Med-LoRAMoE): adapters train, base weights "
                                        "frozen; stages 2-3 (the pipeline: stage 3)")
    add_config_arguments(p, PipelineConfig, "demo pipeline")
    return p


def configs(args):
    """(TrainConfig, ParallelConfig, MoE flags given, PipelineConfig) of the typed flags."""
    from medmoe_mcore.config.model import MoEConfig, ParallelConfig
    from medmoe_mcore.demo.pipeline import PipelineConfig
    from medmoe_mcore.training.arguments import given
    from medmoe_mcore.training.config import TrainConfig

    return (TrainConfig(**given(args, TrainConfig)), ParallelConfig(**given(args, ParallelConfig)),
            given(args, MoEConfig), PipelineConfig(**given(args, PipelineConfig)))


def stage_run(args) -> list:
    """One stage: checks the flags against the checkpoint, then trains."""
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.checkpoint.lock import refuse_if_held
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.demo.pipeline import PipelineConfig
    from medmoe_mcore.training.arguments import (given, reconcile_lora, reconcile_with_checkpoint,
                                                 refuse)
    from medmoe_mcore.training.resume import starting_point
    from medmoe_mcore.training.setup import stage_config

    refuse(args, PipelineConfig, _marked(PipelineConfig, "stage"),
           "demo-pipeline flags; a --stage run does not use them")
    train, par, moe_given, _ = configs(args)
    train.validate(dp=1)  # names what is missing, before anything is read
    start = starting_point(train)  # or an error naming what --load holds
    if train.save:
        refuse_if_held(train.save)  # another run's folder: refused before anything starts
    source = start.folder
    cfg = stage_config(source, par, train)
    notes = reconcile_with_checkpoint(cfg, source, moe_given, getattr(args, "flavor", None))
    notes += reconcile_lora(cfg, source, given(args, LoRAConfig), start.resuming, train.seed)
    if train.tokenizer is None:
        train.tokenizer = str(source / store.TOKENIZER)
    return train_stage(cfg, train, notes)


def train_stage(cfg, train, notes=()) -> list:
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.trainer import Trainer

    parallel.initialize(cfg.parallel, seed=train.seed)
    for note in notes:
        parallel.log(note)
    return Trainer(cfg, train).run()


def pipeline(args) -> dict:
    """The embedded demo, end to end; each step in the process groups it needs."""
    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.conversion.upcycle import upcycle
    from medmoe_mcore.demo import pipeline as demo
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.runtime.parallel import log
    from medmoe_mcore.training.arguments import given, lora_config, moe_config, reconcile_lora
    from medmoe_mcore.training.setup import stage_config

    refuse_stage_flags(args)
    begin = time.time()
    train, par, moe_given, pipe = configs(args)
    moe = moe_config(moe_given, router_file=True)
    moe.validate(language_flavor(pipe.flavor))  # before hours of stages 1-2
    lora_given = given(args, LoRAConfig)
    lora_config(lora_given, moe, train.seed)  # the same: refused now, not after stage 2
    parallel.initialize(one_process_layout(par), seed=train.seed)
    shards, tok, init = demo.prepare_demo(pipe, train.seed)
    ck = init.parent
    losses = {}
    for stage, start in ((1, init), (2, ck / "stage1")):
        log(f"\n=== stage {stage} ===")
        stage_train = demo.stage_train_config(train, stage, pipe, shards, start)
        demo.replace_previous(stage_train.save)
        run = train_stage(stage_config(start, par, stage_train), stage_train)
        losses[f"stage{stage}"] = (run[0], run[-1])
        log(f"stage {stage}: loss {run[0]:.4f} -> {run[-1]:.4f}")

    log("\n=== router ===")
    parallel.initialize(one_process_layout(par), seed=train.seed)
    router_path, accuracy = pipe.router, None
    if moe.router_type == "learned":
        log("learned router (--moe-router-type learned): no modality router to train")
    elif router_path:
        log(f"router: {router_path} (given with --router, not trained)")
    else:
        router_path = os.path.join(pipe.work_dir, "router.safetensors")
        accuracy = demo.train_demo_router(ck / "stage2", shards["router"], router_path, tok,
                                            moe.num_experts)

    log("\n=== upcycling ===")
    demo.replace_previous(ck / "stage3_init")
    upcycle(ck / "stage2", ck / "stage3_init", moe, router_path=router_path)
    log(f"upcycled {ck / 'stage2'} -> {ck / 'stage3_init'}: {moe.num_experts} experts, top-"
        f"{moe.router_topk}, meta expert")

    log("\n=== stage 3 ===")
    stage_train = demo.stage_train_config(train, 3, pipe, shards, ck / "stage3_init")
    demo.replace_previous(stage_train.save)
    cfg = stage_config(ck / "stage3_init", par, stage_train)
    notes = reconcile_lora(cfg, ck / "stage3_init", lora_given, False, train.seed)
    run = train_stage(cfg, stage_train, notes)
    losses["stage3"] = (run[0], run[-1])
    log(f"stage 3: loss {run[0]:.4f} -> {run[-1]:.4f}")

    log("\n=== held-out evaluation ===")
    parallel.initialize(one_process_layout(par), seed=train.seed)
    held_out = demo.evaluate_held_out(pipe, tok)
    return demo.summarise(losses, accuracy, pipe, router_path, time.time() - begin, held_out)


def _marked(cls, mode: str) -> list:
    """Fields whose metadata says `mode=False`: flags that kind of run refuses."""
    from dataclasses import fields

    return [f.name for f in fields(cls) if f.metadata.get(mode) is False]


def refuse_stage_flags(args) -> None:
    from medmoe_mcore.training.arguments import refuse
    from medmoe_mcore.training.config import TrainConfig

    refuse(args, TrainConfig, _marked(TrainConfig, "pipeline"),
           "a single stage's inputs and outputs; the demo pipeline chooses its own (pass "
           "--stage to train one stage)")


def one_process_layout(par):
    """TP = EP = 1 (the pipeline's data, router and evaluation steps) with the run's own
    backend, kernels and collective timeout."""
    import dataclasses

    return dataclasses.replace(par, tensor_model_parallel_size=1, sequence_parallel=False,
                               expert_model_parallel_size=1, expert_tensor_parallel_size=1,
                               pipeline_model_parallel_size=1)


def timed_out(error: BaseException) -> bool:
    """A collective that did not complete within --distributed-timeout-minutes (gloo's and
    torch's wording)."""
    return "timed out" in str(error).lower() or "timeout" in type(error).__name__.lower()


def main(argv=None) -> int:
    import json

    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.runtime.parallel import is_rank0, log
    from medmoe_mcore.training.trainer import RunExited, TrainingStopped

    from medmoe_mcore.training import megatron_flags

    args = megatron_flags.parse(parser(), argv)  # Megatron-LM flags it cannot take: named
    try:
        if getattr(args, "stage", None) is None:
            pipeline(args)
        else:
            log(json.dumps({"losses": stage_run(args)}))
    except ConfigError as e:  # the same refusal on every rank: said once
        if is_rank0():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 3
    except RunExited as e:  # asked for: the checkpoint is saved
        log(f"run ended early: {e.reason}")
        log(json.dumps({"losses": e.losses, "exited": e.reason}))
        return 0
    except RuntimeError as e:
        if not timed_out(e):
            raise
        print(f"error: a collective did not complete within --distributed-timeout-minutes "
              f"{getattr(args, 'distributed_timeout_minutes', '?')} (a rank stalled or was "
              f"lost; the last checkpoint stays the latest): {str(e).splitlines()[0]}",
              file=sys.stderr, flush=True)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
