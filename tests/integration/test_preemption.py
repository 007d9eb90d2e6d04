"""A run on a cluster survives the cluster (examples/pretrain_medmoe.py under torchrun, 2 gloo
ranks): a SIGTERM to the ranks or to the whole job saves the iteration they stop on and exits
0, and the resumed run is bitwise the uninterrupted one; --exit-duration-in-mins likewise; a
stalled rank ends the job within --distributed-timeout-minutes instead of hanging it."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, _free_port, run_tool
from tests.demo_setup import make_workspace

COMMON = ("--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "96",
          "--lr", "1e-3", "--log-interval", "1")
ITERS = 60


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, single_rank):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _stage2(workspace, *args):
    return ("--stage", "2", "--data-path", str(workspace["shards"]["stage2"]),
            "--pretrained-checkpoint", str(workspace["init"]), *COMMON, *map(str, args))


def _torchrun(*args, nproc: int = 2, new_session: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "examples/pretrain_medmoe.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=new_session)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> list[str]:
    """The output lines up to the first that holds `text`."""
    lines, end = [], time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"{text!r} never printed:\n" + "".join(lines[-40:]))


def _finish(proc: subprocess.Popen, lines: list[str], timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return "".join(lines) + out


def _losses(log: str) -> list[float]:
    return json.loads([line for line in log.splitlines() if line.startswith('{"losses"')][-1]
                      )["losses"]


def _stopped_at(log: str) -> int:
    line = next(x for x in log.splitlines() if x.startswith("exiting at iteration "))
    return int(line.split()[3].rstrip(":"))


def _train(*args):
    r = run_tool("examples/pretrain_medmoe.py", *args, nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return _losses(r.stdout), r.stdout


@pytest.mark.slow
def test_sigterm_to_the_ranks_saves_and_resumes_bitwise(tmp_path, workspace):
    run = tmp_path / "run"
    args = _stage2(workspace, "--train-iters", ITERS, "--num-workers", "0",
                   "--exit-signal-handler", "--save", run)
    proc = _torchrun(*args)
    lines = _wait_for(proc, "iteration        3/")
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    log = _finish(proc, lines)
    assert proc.returncode == 0, log[-3000:]
    stop = _stopped_at(log)
    assert 3 <= stop < ITERS, log[-2000:]
    assert "SIGTERM received by a rank (--exit-signal-handler)" in log
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == str(stop)
    first = _losses(log)
    assert len(first) == stop

    rest, log = _train(*_stage2(workspace, "--train-iters", ITERS, "--num-workers", "0",
                                "--exit-signal-handler", "--save", run, "--load", run))
    assert f"resumed from {run / f'iter_{stop:07d}'}: iteration {stop}" in log
    full, _ = _train(*_stage2(workspace, "--train-iters", ITERS, "--num-workers", "0"))
    assert first + rest == full  # bitwise


@pytest.mark.slow
def test_sigterm_to_the_whole_job_leaves_a_complete_checkpoint(tmp_path, workspace):
    """As Slurm does before a time limit: every process of the job gets the signal, the
    torchrun agent, the ranks and their data-loader processes alike."""
    run = tmp_path / "run"
    proc = _torchrun(*_stage2(workspace, "--train-iters", ITERS, "--num-workers", "2",
                              "--exit-signal-handler", "--save", run), new_session=True)
    lines = _wait_for(proc, "iteration        3/")
    os.killpg(proc.pid, signal.SIGTERM)
    log = _finish(proc, lines)
    stop = _stopped_at(log)
    assert "saved checkpoint at iteration" in log, log[-3000:]
    # the agent stops the ranks (SIGTERM, a grace period, then SIGKILL) and torchrun itself
    # ends on the signal: the job's own exit code is not 0, the checkpoint is complete
    assert proc.returncode != 0
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == str(stop)
    more, log = _train(*_stage2(workspace, "--train-iters", stop + 1, "--num-workers", "2",
                                "--save", run, "--load", run, "--override-opt_param-scheduler"))
    assert f"iteration {stop}, consumed samples {4 * stop}" in log and len(more) == 1


@pytest.mark.slow
def test_exit_duration_saves_and_exits_zero(tmp_path, workspace):
    run = tmp_path / "run"
    r = run_tool("examples/pretrain_medmoe.py", *_stage2(
        workspace, "--train-iters", 10_000, "--num-workers", "0", "--save", run,
        "--exit-duration-in-mins", "0.01"), nproc=2, timeout=600)  # 0.6 s: the first iteration
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    stop = _stopped_at(r.stdout)
    assert "--exit-duration-in-mins 0.01 reached" in r.stdout
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == str(stop)


@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_within_the_timeout(tmp_path, workspace):
    run = tmp_path / "run"
    proc = _torchrun(*_stage2(workspace, "--train-iters", ITERS, "--num-workers", "0",
                              "--save", run, "--save-interval", "2",
                              "--distributed-timeout-minutes", "1"))
    lines = _wait_for(proc, "saved checkpoint at iteration 4")
    stalled = psutil.Process(proc.pid).children()[1]
    stalled.send_signal(signal.SIGSTOP)
    start = time.time()
    try:
        log = _finish(proc, lines, timeout=60 + 120)
    finally:
        if stalled.is_running():
            stalled.kill()
    assert time.time() - start < 60 + 120
    assert proc.returncode != 0
    assert "a collective did not complete within --distributed-timeout-minutes 1" in log, \
        log[-3000:]
    saved = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 4
    from medmoe_mcore.checkpoint import integrity
    assert integrity.verify(run / f"iter_{saved:07d}")  # the last checkpoint is intact
