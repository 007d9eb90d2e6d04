"""A data loader that runs in a process of its own, started from a forkserver.

Why: megatron-energon (7.4) starts its worker processes with `fork` only. A training rank,
by the time it reads data, runs other threads (gloo, checkpoint writers, TensorBoard, queue
feeders); a fork while one of them holds CPython's thread-state lock leaves the child
deadlocked in `PyOS_AfterFork_Child` (seen in our CI). Energon's datasets cannot be sent to a
forkserver or spawned worker (they hold lambdas), so instead the whole loader lives in a
helper process started from the forkserver (a single-threaded process: Python 3.14 made it the
default on Linux for this reason); energon forks its workers from there, where nothing else
runs. The rank calls the loader's methods through a pipe; micro-batches' tensors travel
through shared memory (torch.multiprocessing).

The helper ends when asked (`close`), when the rank's end of the pipe closes (the rank exited
or was killed), or at the rank's interpreter exit (a multiprocessing finaliser, run before
multiprocessing waits for its children).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import pickle
import signal
import traceback

# imported once by the forkserver, so that a helper starts in well under a second
PRELOAD = ["torch", "megatron.energon", "medmoe_mcore.data.loader"]
POLL_SECONDS = 1.0
JOIN_SECONDS = 30.0


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:  # e.g. an exception class that takes other arguments
        return RuntimeError("in the data loader process:\n" + "".join(
            traceback.format_exception(error)))


def _serve(conn, factory, args) -> None:
    """The helper: build the loader, then answer (method, args) calls until told to close or
    the pipe closes."""
    # The rank owns this process's life (close, or the pipe's end). A signal meant for the job
    # (Slurm's SIGTERM to every process of the step, a terminal's SIGINT) is the rank's to act
    # on, and the rank still reads micro-batches and this loader's state until it has saved:
    # the helper ignores both, and blocks them for the energon workers it forks (they inherit
    # the mask; torch installs a SIGTERM handler in its workers that would end them).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        loader = factory(*args)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the rank
        conn.send(("error", _picklable(e)))
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                name, call_args = conn.recv()
            except (EOFError, OSError):  # the rank is gone
                return
            if name == "close":
                return
            try:
                reply = ("ok", getattr(loader, name)(*call_args))
            except Exception as e:  # noqa: BLE001
                reply = ("error", _picklable(e))
            conn.send(reply)
    finally:
        loader.close()
        conn.close()


def _stop(conn, process) -> None:
    """Tell the helper to close (it stops its energon workers) and wait for it."""
    try:
        conn.send(("close", ()))
    except (OSError, ValueError):
        pass
    conn.close()
    process.join(JOIN_SECONDS)
    if process.is_alive():
        process.terminate()
        process.join(JOIN_SECONDS)


class LoaderProcess:
    """`factory(*args)` (a TrainingBatches or ValidationBatches, data/loader.py) built and run
    in a helper process; `METHODS` called there, with the same results and exceptions."""

    METHODS = frozenset({"next", "state_bytes", "restore_bytes", "micro_batches",
                         "skipped", "read_per_dataset"})

    def __init__(self, factory, args: tuple, name: str):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)  # only until the forkserver has started
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, factory, args),
                                    name=f"medmoe {name} loader")
        self._process.start()
        child.close()
        self._finalizer = multiprocessing.util.Finalize(
            self, _stop, args=(self._conn, self._process), exitpriority=10)
        self._receive()  # the loader was built, or its error is raised here

    def _receive(self):
        while not self._conn.poll(POLL_SECONDS):
            if not self._process.is_alive():
                raise RuntimeError(f"the data loader process ({self._process.name}) ended "
                                   f"with exit code {self._process.exitcode}")
        status, value = self._conn.recv()
        if status == "error":
            raise value
        return value

    def __getattr__(self, name: str):
        if name not in LoaderProcess.METHODS:
            raise AttributeError(name)
        return lambda *args: self._call(name, args)

    def _call(self, name: str, args: tuple):
        self._conn.send((name, args))
        return self._receive()

    def close(self) -> None:
        self._finalizer()  # runs once
