"""One writer per save folder: a lock file created atomically in the folder.

`<folder>/medmoe.lock` holds who owns the folder (host, pid, the process's start time, what it
is doing, when it began). It is created with O_CREAT | O_EXCL, which is atomic on local and
network file systems, by one process (rank 0 of a run, or a converter) before any compute, and
removed when that process ends its work. A second run or converter on the same folder is
refused at start, naming the holder. A lock whose process is gone (same host, and the pid dead
or reused by a process that started later) is stale: it is taken over with a warning, through a
rename that only one contender can win. A lock held from another host cannot be checked from
here and is refused with the file to delete if that run is known to be over.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from pathlib import Path

from medmoe_mcore.config.fields import ConfigError

LOCK = "medmoe.lock"


class FolderLocked(ConfigError):
    """Another live process owns the folder."""


def _job() -> str | None:
    """The launch this process belongs to (torchrun's run id and rendezvous address): the
    ranks of one job share it, two live jobs never do (they cannot share a master port)."""
    if "MASTER_PORT" not in os.environ:
        return None
    return (f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}|{os.environ.get('MASTER_ADDR', '')}:"
            f"{os.environ['MASTER_PORT']}")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None where unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder: dict) -> bool | None:
    """Whether the holder still runs: None where it cannot be known (another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("start_ticks") in (None, ticks)


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    return (f"{holder.get('what', 'a process')} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')})")


class FolderLock:
    """The lock on one folder, held by this process until `release`."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder, self.path = Path(folder), Path(folder) / LOCK
        self.token = uuid.uuid4().hex[:12]
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "start_ticks": _start_ticks(os.getpid()), "job": _job(), "what": what,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token}
        self.warning: str | None = None
        self.held = False

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a contender may take a stale lock over between our steps
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            self.held = True
            atexit.register(self.release)  # however the process ends short of a kill
            return self
        raise FolderLocked(f"{self.folder}: another process keeps taking its lock ({self.path})")

    def _take_over_if_stale(self) -> None:
        holder = _read(self.path)
        alive = _alive(holder) if holder else False
        if alive is None:
            raise FolderLocked(f"{self.folder} is in use by {describe(holder)}: one run per "
                               f"save folder. Choose another folder, or, if that run is over, "
                               f"delete {self.path}")
        if alive:
            raise FolderLocked(f"{self.folder} is in use by {describe(holder)}: one run per "
                               "save folder; choose another folder or wait for it to end")
        aside = self.path.with_name(f"{LOCK}.stale-{self.token}")
        try:
            os.rename(self.path, aside)  # only one contender's rename succeeds
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        self.warning = (f"WARNING: {self.folder}: took over the lock of {describe(holder)}, "
                        "which is no longer running (its unfinished save, if any, is ignored)")

    def release(self) -> None:
        """Remove the lock if it is still ours (a replaced folder took it along)."""
        if self.held and _read(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_if_held(folder: str | os.PathLike) -> None:
    """Refuse to write into a folder a live process of another job owns (a stale lock, or one
    of this process or of another rank of its job, is no refusal)."""
    path = Path(folder) / LOCK
    if path.exists():
        holder = _read(path)
        ours = holder.get("pid") == os.getpid() or (_job() is not None
                                                    and holder.get("job") == _job())
        if holder and not ours and _alive(holder) is not False:
            raise FolderLocked(f"{folder} is in use by {describe(holder)}: it is not written "
                               f"while that runs (if it is over, delete {path})")
