"""Faults a new user meets (issue 14), end to end through examples/pretrain_medmoe.py: a
resume whose schedule differs, a lost tracker, a save that would replace another run's work,
and non-finite losses. Each refusal names the flag or file and comes before any compute."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_tool
from tests.demo_setup import make_workspace

COMMON = ("--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "96",
          "--lr", "1e-3", "--log-interval", "1", "--num-workers", "0")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, single_rank):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _run(*args):
    return run_tool("examples/pretrain_medmoe.py", *COMMON, *map(str, args), timeout=600)


def test_resume_semantics(tmp_path, workspace):
    stage2 = ("--stage", "2", "--data-path", workspace["shards"]["stage2"],
              "--pretrained-checkpoint", workspace["init"])
    run = tmp_path / "run"
    r = _run(*stage2, "--train-iters", "4", "--save", run, "--save-interval", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    # another --train-iters on resume: refused naming both values, before the model is built
    r = _run(*stage2, "--train-iters", "8", "--load", run, "--save", run)
    assert r.returncode == 2 and "--train-iters gives lr_decay_steps=8, the checkpoint has 4" \
        in r.stderr and "--override-opt_param-scheduler" in r.stderr, r.stderr[-2000:]
    r = _run(*stage2, "--train-iters", "6", "--load", run, "--save", run,
             "--override-opt_param-scheduler", "--no-load-optim", "--no-load-rng")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "started afresh: optimizer state (--no-load-optim), RNG (--no-load-rng)" in r.stdout
    lrs = [float(line.split("learning rate: ")[1].split(" |")[0])
           for line in r.stdout.splitlines() if "learning rate: " in line]
    assert "the flags win" in r.stdout and len(lrs) == 2 and lrs[0] > 0, r.stdout[-2000:]
    # the tracker lost: refused naming the newest; an older step cannot save over newer work
    (run / "latest_checkpointed_iteration.txt").unlink()
    r = _run(*stage2, "--train-iters", "8", "--load", run, "--save", run)
    assert r.returncode == 2 and "newest 6); pass --ckpt-step 6" in r.stderr, r.stderr[-2000:]
    r = _run(*stage2, "--train-iters", "4", "--load", run, "--ckpt-step", "2", "--save", run)
    assert r.returncode == 2 and "already holds iter_0000004 .. iter_0000006" in r.stderr, \
        r.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == ["iter_0000002", "iter_0000004",
                                                     "iter_0000006"]
    # a missing --load with --pretrained-checkpoint starts afresh, saying so
    r = _run(*stage2, "--train-iters", "1", "--load", tmp_path / "new", "--save",
             tmp_path / "new")
    assert r.returncode == 0 and "WARNING: --load" in r.stdout and "new does not exist" in \
        r.stdout, r.stdout[-2000:]


def test_non_finite_training_stops_and_is_never_saved(tmp_path, workspace):
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.models.medmoe import MedMoEModel

    cfg = store.read_config(workspace["init"])
    model = MedMoEModel(cfg)
    store.load_into(model, workspace["init"])
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "projector" in n).fill_(float("nan"))
    files, dirs = store.carried(store.resolve(workspace["init"]))
    store.save(model.sharded_state_dict(), tmp_path / "nan", cfg, extra_files=files,
                       extra_dirs=dirs)
    stage2 = ("--stage", "2", "--data-path", workspace["shards"]["stage2"],
              "--pretrained-checkpoint", tmp_path / "nan", "--train-iters", "6",
              "--save", tmp_path / "out", "--save-interval", "5")
    r = _run(*stage2, "--tensorboard-dir", tmp_path / "tb")
    assert r.returncode == 3 and "iterations 1-3: 3 consecutive iterations with a non-finite" \
        in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / "tb" / "stage2")).Reload()  # kept when stopped
    assert [e.step for e in events.Scalars("lm-loss")] == [1, 2, 3]
    r = _run(*stage2, "--no-check-for-nan-in-loss-and-grad")
    assert r.returncode == 3 and "iteration 5: not saving: parameters hold non-finite" in \
        r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any(
        p.name.startswith("iter_") and ".tmp" not in p.name
        for p in (tmp_path / "out").iterdir())


def test_one_run_per_save_folder_and_a_dead_runs_lock_taken_over(tmp_path, workspace):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    stage2 = ("--stage", "2", "--data-path", workspace["shards"]["stage2"],
              "--pretrained-checkpoint", workspace["init"])
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "examples/pretrain_medmoe.py", *COMMON,
                              *map(str, stage2), "--train-iters", "100000", "--save", str(run),
                              "--save-interval", "100000"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "medmoe.lock").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (run / "medmoe.lock").exists(), "the first run never took the folder's lock"
        start = time.time()
        r = _run(*stage2, "--train-iters", "2", "--save", run)
        assert r.returncode == 2 and f"is in use by training run (stage 2) (pid {first.pid} " \
            in r.stderr and r.stderr.count("error:") == 1, r.stderr[-2000:]
        assert time.time() - start < 60 and not any(run.glob("iter_*"))
    finally:
        first.send_signal(signal.SIGKILL)  # no chance to release: the lock stays, stale
        first.wait()
    assert (run / "medmoe.lock").exists()
    r = _run(*stage2, "--train-iters", "2", "--save", run)
    assert r.returncode == 0 and "took over the lock of training run (stage 2)" in r.stdout, \
        r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == ["iter_0000002",
                                                     "latest_checkpointed_iteration.txt"]
