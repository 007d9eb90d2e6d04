"""The CLI generated from the config dataclasses, and a stage run's flags checked against its
checkpoint before anything is built."""

import importlib.util
from pathlib import Path

import pytest

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import language_flavor, vision_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig
from medmoe_mcore.training.arguments import reconcile_with_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("pretrain_medmoe",
                                                  ROOT / "examples" / "pretrain_medmoe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkpoint(root: Path, moe: MoEConfig | None) -> Path:
    """A checkpoint folder with only its config: enough for everything before the model."""
    cfg = ModelConfig(language=language_flavor("tiny"), moe=moe,
                      vision=vision_flavor("tiny", 3))
    folder = root / "release"
    folder.mkdir(parents=True)
    (folder / store.CONFIG).write_text(cfg.to_json())
    (root / store.TRACKER).write_text("release")
    return root


def test_help_shows_help_and_default_for_every_flag():
    parser = _example().parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 35
    for action in flags:
        assert action.help and "(default: " in action.help, action.option_strings
    text = parser.format_help()
    for flag in ("--moe-router-topk", "--num-experts", "--tensor-model-parallel-size",
                 "--moe-token-dispatcher-type {alltoall,allgather}", "--flavor {phi2,"):
        assert flag in text


def test_stage_run_contradicting_its_checkpoint_fails_before_building(tmp_path, monkeypatch,
                                                                       capsys):
    example = _example()
    ckpt = _checkpoint(tmp_path / "s3", MoEConfig(num_experts=4, router_topk=1))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was about to be built")

    monkeypatch.setattr(example, "train_stage", must_not_run)
    code = example.main(["--stage", "3", "--pretrained-checkpoint", str(ckpt), "--data-path",
                         "x", "--lr", "1e-5", "--train-iters", "2", "--num-experts", "8",
                         "--moe-router-topk", "3", "--flavor", "phi2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--num-experts 8: the checkpoint has moe.num_experts=4" in err
    assert "--moe-router-topk 3: the checkpoint has moe.router_topk=1" in err
    assert "--flavor phi2: the checkpoint is flavor tiny" in err


def test_runtime_choice_is_applied_and_said(tmp_path):
    ckpt = _checkpoint(tmp_path / "s3", MoEConfig())
    cfg = store.read_config(ckpt)
    notes = reconcile_with_checkpoint(cfg, ckpt, {"token_dispatcher": "allgather",
                                                  "num_experts": 4}, "tiny")
    assert cfg.moe.token_dispatcher == "allgather"
    assert notes == ["applied --moe-token-dispatcher-type allgather (the checkpoint has "
                     "moe.token_dispatcher=alltoall)"]


def test_moe_flags_on_a_dense_checkpoint_are_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "s2", None)
    with pytest.raises(ConfigError, match="--num-experts: the checkpoint is dense"):
        reconcile_with_checkpoint(store.read_config(ckpt), ckpt, {"num_experts": 4},
                                  None)


def test_flags_a_run_cannot_honour_are_refused(tmp_path, capsys):
    example = _example()
    with pytest.raises(SystemExit):
        example.parser().parse_args(["--flavor", "nosuchflavor"])
    assert "invalid choice: 'nosuchflavor'" in capsys.readouterr().err
    assert example.main(["--data-path", "x", "--load", "y"]) == 2  # pipeline: no stage inputs
    assert "--data-path, --load: a single stage's inputs" in capsys.readouterr().err
    ckpt = _checkpoint(tmp_path / "s2", None)
    assert example.main(["--stage", "2", "--pretrained-checkpoint", str(ckpt),
                         "--work-dir", "w"]) == 2
    assert "--work-dir: demo-pipeline flags" in capsys.readouterr().err
    assert example.main(["--stage", "2", "--pretrained-checkpoint", str(ckpt)]) == 2
    assert "--stage 2 needs --data-path, --train-iters, --lr" in capsys.readouterr().err
    common = ["--stage", "2", "--pretrained-checkpoint", str(ckpt), "--data-path", "d",
              "--train-iters", "4", "--lr", "1e-3"]
    assert example.main([*common, "--eval-interval", "2"]) == 2  # nothing to validate on
    assert "--eval-interval without --valid-data-path" in capsys.readouterr().err
    assert example.main([*common, "--valid-data-path", "v", "--eval-iters", "0"]) == 2
    assert "--eval-iters 0: must be a positive integer" in capsys.readouterr().err
    assert example.main(["--valid-data-path", "v"]) == 2  # the pipeline brings its own
    assert "--valid-data-path: a single stage's inputs" in capsys.readouterr().err
    assert example.main([*common, "--lora-alpha", "8"]) == 2  # LoRA: the rank makes it
    assert "--lora-alpha without --lora-rank" in capsys.readouterr().err


def test_bf16_on_cpu_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """Megatron's mixed-precision optimizer takes CUDA tensors only: on CPU the flag is
    refused naming it, not met by a traceback after the model is built."""
    monkeypatch.setenv("MEDMOE_DEVICE", "cpu")
    ckpt = _checkpoint(tmp_path / "s2", None)
    assert _example().main(["--stage", "2", "--pretrained-checkpoint", str(ckpt),
                            "--data-path", "d", "--train-iters", "4", "--lr", "1e-3",
                            "--bf16"]) == 2
    assert "--bf16: Megatron's mixed-precision optimizer needs CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--exit-signal", "SIGUSR1"], "--exit-signal SIGUSR1 without --exit-signal-handler"),
    (["--exit-signal-handler"], "--exit-signal-handler without --save"),
    (["--exit-duration-in-mins", "30"], "--exit-duration-in-mins without --save"),
    (["--exit-duration-in-mins", "0", "--save", "x"], "--exit-duration-in-mins 0.0: must be"),
])
def test_early_exit_flags_refused_when_they_cannot_work(flags, message, tmp_path):
    from medmoe_mcore.training.arguments import given
    from medmoe_mcore.training.config import TrainConfig

    args = _example().parser().parse_args(
        ["--stage", "2", "--data-path", "d", "--train-iters", "2", "--lr", "1e-3",
         "--pretrained-checkpoint", "p", *flags])
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**given(args, TrainConfig)).validate(dp=1)


def test_cluster_flags_parse_with_megatron_names():
    args = _example().parser().parse_args(
        ["--exit-signal-handler", "--exit-signal", "SIGUSR2", "--exit-duration-in-mins", "5",
         "--distributed-timeout-minutes", "3", "--transformer-impl", "local"])
    assert (args.exit_signal_handler, args.exit_signal, args.exit_duration_in_mins,
            args.distributed_timeout_minutes, args.transformer_impl) == \
        (True, "SIGUSR2", 5.0, 3, "local")
