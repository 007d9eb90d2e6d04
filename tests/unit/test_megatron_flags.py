"""A Megatron-LM MoE recipe through the trainer's parser (examples/pretrain_medmoe.py): every
flag is either taken and applied (read back from the configs it builds) or refused naming the
flag with a reason, never argparse's generic "unrecognized arguments"; an unknown flag gets the
nearest names; each learning-rate decay style gives Megatron's own scheduler's learning rates;
a resume that would change the optimizer or an unsaved schedule argument is refused."""

import importlib.util
from pathlib import Path

import pytest

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.training import megatron_flags

ROOT = Path(__file__).resolve().parents[2]

# Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh, its commented-out flags
# included, with values; taken by this trainer and applied:
TAKEN = {
    "--seq-length": "256", "--num-experts": "2", "--moe-router-topk": "2",
    "--moe-aux-loss-coeff": "1e-2", "--moe-grouped-gemm": None,
    "--moe-token-dispatcher-type": "alltoall", "--overlap-param-gather": None,
    "--overlap-grad-reduce": None, "--micro-batch-size": "1", "--global-batch-size": "4",
    "--lr": "1e-4", "--train-iters": "7", "--lr-decay-iters": "320000",
    "--lr-decay-style": "cosine", "--min-lr": "1.0e-5", "--weight-decay": "0.1",
    "--lr-warmup-iters": "500", "--clip-grad": "1.0", "--bf16": None,
    "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1",
    "--expert-model-parallel-size": "2", "--use-distributed-optimizer": None,
    "--sequence-parallel": None, "--log-interval": "1", "--save-interval": "10000",
    "--eval-interval": "1000", "--eval-iters": "10", "--save": "ckpt", "--load": "ckpt",
    "--tensorboard-dir": "ckpt/tensorboard", "--no-load-optim": None, "--no-load-rng": None,
    "--use-mcore-models": None, "--no-position-embedding": None,
    "--no-masked-softmax-fusion": None, "--wandb-project": "Mixtral",
    "--wandb-exp-name": "Mixtral_8x7B", "--log-throughput": None,
    "--moe-router-load-balancing-type": "aux_loss", "--context-parallel-size": "1",
    "--ckpt-format": "torch_dist", "--recompute-granularity": "full",
    "--recompute-method": "uniform", "--recompute-num-layers": "1",
}
# ... and refused, each with its reason:
REFUSED = {
    "--disable-bias-linear": None, "--max-position-embeddings": "2048", "--num-layers": "2",
    "--hidden-size": "256", "--ffn-hidden-size": "896", "--num-attention-heads": "2",
    "--init-method-std": "0.01", "--attention-dropout": "0.0", "--hidden-dropout": "0.0",
    "--normalization": "RMSNorm", "--position-embedding-type": "rope", "--swiglu": None,
    "--untie-embeddings-and-output-weights": None, "--group-query-attention": None,
    "--num-query-groups": "2", "--rotary-base": "1000000",
    "--tokenizer-type": "Llama2Tokenizer",
    "--tokenizer-model": "tokenizer.model", "--mock-data": None, "--split": "99990,8,2",
}


def _argv(flags: dict) -> list[str]:
    return [item for flag, value in flags.items() for item in (flag, value) if item is not None]


def _parser():
    spec = importlib.util.spec_from_file_location("pretrain", ROOT / "examples" /
                                                  "pretrain_medmoe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_megatron_moe_recipe_is_taken_or_refused_flag_by_flag(capsys):
    assert len(TAKEN) + len(REFUSED) >= 40
    pretrain = _parser()
    args = megatron_flags.parse(pretrain.parser(), ["--stage", "3", *_argv(TAKEN)])
    train, par, moe, _ = pretrain.configs(args)
    assert (train.lr_decay_style, train.lr_decay_iters, train.lr_warmup_iters) == (
        "cosine", 320000, 500)
    assert (train.min_lr, train.weight_decay, train.clip_grad, train.bf16) == (1e-5, 0.1, 1.0,
                                                                               True)
    assert train.use_distributed_optimizer and train.overlap_grad_reduce \
        and train.overlap_param_gather and not train.load_optim and not train.load_rng
    assert (par.expert_model_parallel_size, par.sequence_parallel, par.moe_grouped_gemm) == (
        2, True, True)
    assert moe == {"num_experts": 2, "router_topk": 2, "aux_loss_coeff": 0.01,
                   "token_dispatcher": "alltoall", "load_balancing_type": "aux_loss"}
    assert train.schedule()["lr_warmup_steps"] == 500
    assert (train.wandb_project, train.wandb_exp_name, train.log_throughput) == (
        "Mixtral", "Mixtral_8x7B", True)
    assert (par.context_parallel_size, train.ckpt_format) == (1, "torch_dist")
    assert (train.recompute_granularity, train.recompute_method, train.recompute_num_layers) == (
        "full", "uniform", 1)
    with pytest.raises(SystemExit) as stop:
        megatron_flags.parse(pretrain.parser(), ["--stage", "3", *_argv(TAKEN),
                                                 *_argv(REFUSED)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err
    for flag in REFUSED:
        assert f"{flag}: {megatron_flags.UNSUPPORTED[flag]}" in err, flag


def test_values_this_trainer_cannot_run_are_refused_with_the_reason():
    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.model import ParallelConfig

    with pytest.raises(ConfigError, match="--context-parallel-size.*not built"):
        ParallelConfig(context_parallel_size=2).validate(language_flavor("tiny"))
    with pytest.raises(SystemExit):
        _parser().parser().parse_args(["--ckpt-format", "torch"])


def test_an_unknown_flag_gets_the_nearest_names(capsys):
    with pytest.raises(SystemExit):
        megatron_flags.parse(_parser().parser(), ["--stage", "2", "--lr-warmup-iter", "5",
                                                  "--global-batchsize", "8"])
    err = capsys.readouterr().err
    assert "--global-batchsize: not a flag of this trainer (nearest: --global-batch-size" in err


def test_no_refused_flag_is_one_of_ours():
    parser = _parser().parser()
    ours = {s for action in parser._actions for s in action.option_strings}
    assert not ours & (set(megatron_flags.UNSUPPORTED) | set(megatron_flags.ALWAYS))


@pytest.mark.parametrize("flags", [
    dict(lr_decay_style="constant"), dict(lr_decay_style="linear", lr_warmup_init=1e-5),
    dict(lr_decay_style="cosine", lr_decay_iters=80), dict(lr_decay_style="inverse-square-root"),
    dict(lr_decay_style="WSD", lr_wsd_decay_iters=30, lr_wsd_decay_style="linear"),
    dict(lr_decay_style="WSD", lr_wsd_decay_iters=40, lr_warmup_fraction=0.1),
])
def test_every_decay_style_is_megatrons_schedule(single_rank, flags):
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from medmoe_mcore.training.config import TrainConfig

    train = TrainConfig(stage=2, data_path=["d"], lr=1e-3, min_lr=1e-4, train_iters=100,
                        pretrained_checkpoint="c", lr_warmup_iters=None
                        if "lr_warmup_fraction" in flags else 10, **flags).validate(1)

    class Optimizer:  # what the scheduler touches
        param_groups = [{"params": [torch.zeros(1)]}]

    def scheduler(**kwargs):
        return OptimizerParamScheduler(Optimizer(), start_wd=0.0, end_wd=0.0, wd_incr_steps=100,
                                       wd_incr_style="constant", **kwargs)

    ours = scheduler(init_lr=train.run_flags()["init_lr"], **train.schedule(),
                     wsd_decay_steps=train.lr_wsd_decay_iters,
                     lr_wsd_decay_style=train.run_flags()["lr_wsd_decay_style"])
    decay = flags.get("lr_decay_iters", 100)  # Megatron-LM's translation of the same flags
    warmup = int(0.1 * decay) if "lr_warmup_fraction" in flags else 10
    megatron = scheduler(init_lr=flags.get("lr_warmup_init", 0.0), max_lr=1e-3, min_lr=1e-4,
                         lr_warmup_steps=warmup, lr_decay_steps=decay,
                         lr_decay_style=flags["lr_decay_style"],
                         wsd_decay_steps=flags.get("lr_wsd_decay_iters"),
                         lr_wsd_decay_style=flags.get("lr_wsd_decay_style", "exponential")
                         if flags["lr_decay_style"] == "WSD" else None)
    for step in (0, 1, 5, 10, 11, 40, 65, 75, 90, 99, 100):
        ours.num_steps = megatron.num_steps = step
        assert ours.get_lr(Optimizer.param_groups[0]) == megatron.get_lr(
            Optimizer.param_groups[0]), step


@pytest.mark.parametrize("flags,message", [
    (dict(lr_warmup_iters=5, lr_warmup_fraction=0.1),
     "--lr-warmup-iters and --lr-warmup-fraction: choose one"),
    (dict(lr_decay_style="WSD"), "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (dict(lr_wsd_decay_iters=5), "--lr-wsd-decay-iters without --lr-decay-style WSD"),
    (dict(adam_beta2=1.0), r"--adam-beta2 1.0: must be in \[0, 1\)"),
])
def test_schedule_and_optimizer_flags_are_checked(flags, message):
    from medmoe_mcore.training.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(stage=2, data_path=["d"], lr=1e-3, train_iters=100,
                    pretrained_checkpoint="c", **flags).validate(1)


def test_a_resume_names_what_it_would_change():
    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.resume import run_flag_differences

    old = TrainConfig(stage=2, data_path=["d"], lr=1e-3, train_iters=100,
                      pretrained_checkpoint="c").validate(1)
    saved_scheduler = {**old.schedule()}
    same = run_flag_differences(saved_scheduler, None, old)  # saved before run flags existed
    assert same == {}
    new = TrainConfig(stage=2, data_path=["d"], lr=1e-3, train_iters=100,
                      pretrained_checkpoint="c", adam_beta2=0.95, lr_warmup_init=1e-5,
                      lr_decay_style="linear").validate(1)
    diff = run_flag_differences(saved_scheduler, old.run_flags(), new)
    assert diff == {
        "adam_beta2": "--adam-beta2 gives adam_beta2=0.95, the checkpoint has 0.999",
        "init_lr": "--lr-warmup-init gives init_lr=1e-05, the checkpoint has 0.0",
        "lr_decay_style": "--lr-decay-style gives lr_decay_style='linear', the checkpoint has "
                          "'cosine'"}
