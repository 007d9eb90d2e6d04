"""Megatron-LM's logging and garbage-collection switches: --tensorboard-log-interval writes the
loss, learning rate and grad norm every N iterations and the window figures at log lines;
--manual-gc pauses the automatic collector, collects at its interval and after validation,
and restores the collector at the end."""

import gc

from medmoe_mcore.training import manual_gc, metrics
from medmoe_mcore.training.config import TrainConfig
from medmoe_mcore.training.trainer import StepResult


class Recorder:
    def __init__(self):
        self.points = {}

    def scalars(self, values, iteration):
        self.points.setdefault(iteration, {}).update(values)

    def close(self):
        pass


def test_points_every_tensorboard_log_interval_and_windows_at_log_lines(capsys):
    m = metrics.TrainingMetrics(TrainConfig(train_iters=6, log_interval=3,
                                            tensorboard_log_interval=2), dp=1)
    m.sinks = [sink := Recorder()]
    for it in range(1, 7):
        m.record(it, it * 8, StepResult(1.0 / it, 0.5, 1e-3, 100, False, 0.0))
    assert sorted(sink.points) == [2, 3, 4, 6]
    assert set(sink.points[2]) == set(sink.points[4]) == {"lm-loss", "learning-rate",
                                                          "grad-norm"}
    assert "tokens-per-sec" in sink.points[3] and "tokens-per-sec" in sink.points[6]
    assert sink.points[4]["lm-loss"] == 0.25
    assert capsys.readouterr().out.count("lm loss:") == 2


def test_manual_gc(monkeypatch):
    collected = []
    monkeypatch.setattr(manual_gc.gc, "collect", lambda: collected.append(1))
    assert gc.isenabled()
    collector = manual_gc.ManualGC(True, 2, True)
    try:
        assert not gc.isenabled() and len(collected) == 1  # paused, one collection at start
        for it in range(1, 6):
            collector.step(it)
        assert len(collected) == 3  # iterations 2 and 4
        collector.evaluated()
        assert len(collected) == 4
    finally:
        collector.close()
    assert gc.isenabled()
    off = manual_gc.ManualGC(False, 2, True)
    off.step(2), off.evaluated(), off.close()
    assert gc.isenabled() and len(collected) == 4
