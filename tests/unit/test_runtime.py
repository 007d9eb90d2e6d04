"""Runtime guardrails, expert-parameter tags and the training log window."""

import itertools

import pytest
import torch

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import language_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
from medmoe_mcore.models.language import LanguageModel
from medmoe_mcore.runtime import cpu, parallel


def test_device_override(monkeypatch):
    monkeypatch.setenv(parallel.DEVICE_ENV, "tpu")
    with pytest.raises(ConfigError, match="MEDMOE_DEVICE='tpu'"):
        parallel.use_cuda()
    monkeypatch.setenv(parallel.DEVICE_ENV, "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="MEDMOE_DEVICE=cuda but"):
            parallel.use_cuda()
    monkeypatch.setenv(parallel.DEVICE_ENV, "cpu")
    assert parallel.use_cuda() is False


def test_cpu_runtime_announces_once_and_checks_the_megatron_line(monkeypatch, capsys):
    assert cpu.is_active()  # the test run's single_rank group runs on it
    monkeypatch.setattr(cpu, "_ANNOUNCED", False)
    monkeypatch.setattr(cpu, "megatron_version", lambda: "0.17.0")
    cpu.announce(rank0=True)
    cpu.announce(rank0=True)
    out = capsys.readouterr().out
    assert out.count("CPU runtime active") == 1
    assert "megatron-core 0.17.0 is installed; the CPU runtime layer was written and tested " \
           "for 0.16.x" in out


@pytest.mark.parametrize("family", ["tiny", "tiny_stablelm"])
def test_expert_parameters_are_tagged_after_build(family):
    cfg = ModelConfig(language=language_flavor(family), moe=MoEConfig(num_experts=4))
    model = LanguageModel(cfg)
    experts = 0
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            experts += 1
            assert param.allreduce is False and param.sequence_parallel is False, name
        else:  # dense weights, router and meta expert: reduced like any replicated weight
            assert getattr(param, "allreduce", True) is True, name
    per_expert = 4 if family == "tiny" else 2  # Phi: fc1/fc2 weight + bias; StableLM: weights
    assert experts == 2 * 4 * per_expert  # 2 MoE layers of 4 experts


def test_last_short_log_window_divides_by_its_own_length(monkeypatch, capsys):
    from medmoe_mcore.training import metrics
    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.trainer import StepResult

    clock = itertools.chain([0.0, 3.0], itertools.repeat(3.0))
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    m = metrics.TrainingMetrics(TrainConfig(train_iters=3, log_interval=10,
                                            log_throughput=True), dp=1)
    for it in (1, 2, 3):
        m.record(it, it * 8, StepResult(1.0, 0.5, 1e-3, 100, False, 0.01, flops=10 ** 12))
    line = capsys.readouterr().out
    assert "elapsed time per iteration (ms): 1000.0" in line  # 3 s over 3 iterations
    # 3 x 10^12 FLOPs in 3 s on a job of one process
    assert "throughput per GPU (TFLOP/s/GPU): 1.000" in line
    assert "tokens/s: 100" in line
    assert "data wait (%): 1.0" in line  # 3 x 0.01 s of 3 s


def test_params_norm_counts_every_parameter_once(single_rank):
    from medmoe_mcore.config.flavors import language_flavor
    from medmoe_mcore.config.model import ModelConfig, MoEConfig
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.training import metrics

    model = LanguageModel(ModelConfig(language=language_flavor("tiny"),
                                      moe=MoEConfig(num_experts=4)).validate())
    expected = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in model.parameters()))
    assert any(getattr(p, "allreduce", True) is False for p in model.parameters())  # experts
    assert metrics.params_norm(model) == pytest.approx(float(expected), rel=1e-12)


def test_initialize_seeds_python_and_numpy_as_megatron_does():
    import random

    import numpy as np

    draws = []
    for _ in range(2):
        parallel.initialize(ParallelConfig(), seed=7)
        draws.append((random.random(), float(np.random.rand())))
    parallel.initialize(ParallelConfig())  # the session's default seed back
    assert draws[0] == draws[1]
