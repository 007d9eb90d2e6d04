"""One writer per save folder, against real processes: a live holder refuses a second writer
(a converter too, even with --overwrite); a killed or dead holder's lock is taken over with a
warning."""

import json
import os
import socket
import subprocess
import sys

import pytest

from medmoe_mcore.checkpoint import store
from medmoe_mcore.checkpoint.lock import LOCK, FolderLock, FolderLocked, refuse_if_held


def test_a_live_lock_refuses_a_second_writer_then_dies_and_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from medmoe_mcore.checkpoint.lock import "
         "FolderLock; FolderLock(sys.argv[1], 'training run (stage 2)').acquire(); "
         "print('held', flush=True); time.sleep(60)", str(folder)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        text = f"is in use by training run \\(stage 2\\) \\(pid {holder.pid} on"
        with pytest.raises(FolderLocked, match=text):
            FolderLock(folder, "a second run").acquire()
        with pytest.raises(FolderLocked, match=text):  # a converter, even with --overwrite
            store.check_can_release(folder, overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(folder, "a second run") as lock:  # killed: its lock is stale
        assert "took over the lock of training run (stage 2)" in lock.warning
    assert not (folder / LOCK).exists()
    refuse_if_held(folder)  # free again


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                           "what": "training run (stage 3)"}))
    refuse_if_held(folder)  # stale: no refusal
    lock = FolderLock(folder, "training run (stage 3)").acquire()
    assert "took over the lock of training run (stage 3)" in lock.warning
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
