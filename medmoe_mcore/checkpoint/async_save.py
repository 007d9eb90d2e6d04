"""Asynchronous checkpoint saves (`--async-save`, Megatron-LM's flag) through Megatron-Core's own
machinery: `dist_checkpointing.save(..., async_sharded_save=True)` plans the save with every
rank (a collective) and returns a request whose writer Megatron runs in a forked process
(`AsyncCallsQueue`): the fork's memory is a copy-on-write snapshot of the state at the save, so
the step loop goes on updating the weights while the files are written, and the files hold
exactly the saved iteration (tested: the same bytes as a synchronous save).

Nothing is re-read on the step loop: the writer process hashes this rank's shards right after
writing them (from the page cache) and leaves the entries beside them; the finalisation, run on
every rank once every writer is done (`finish`, checked after each iteration), hashes only the
small files (config, common state, metadata) and then renames the folder and moves the tracker,
as a synchronous save does. A rank killed during the write leaves the temporary folder and the
previous checkpoint the latest.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from medmoe_mcore.checkpoint import integrity, store
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.runtime.parallel import log

# this rank's shard entries, written by its writer process and consumed at finalisation
WRITTEN = ".written-checksums-{rank}.json"


def _write_then_hash(write, folder: str, rank: int, *args, **kwargs) -> None:
    """In the writer process: Megatron's write, then the entries of the shards it wrote."""
    write(*args, **kwargs)
    folder = Path(folder)
    entries = {p.name: integrity.entry(p) for p in sorted(folder.glob(f"__{rank}_*.distcp"))}
    path = folder / WRITTEN.format(rank=rank)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


class AsyncSaver:
    """One run's background saves."""

    def __init__(self):
        self.queue = AsyncCallsQueue()  # a forked writer per save (Megatron's default)

    def save(self, sharded_state_dict: dict, root, cfg: ModelConfig, iteration: int,
             extra_files: dict | None = None, extra_dirs: dict | None = None) -> Path:
        """Collective: start writing; returns the folder the checkpoint will be once done.
        One save is in flight at a time: the one before is completed first (waiting only if
        its writer is still busy), so checkpoints complete in order and a run never holds
        more than one snapshot."""
        self.finish(wait=True)
        to = store.begin_save(root, iteration)
        request = dist_checkpointing.save(store.portable(sharded_state_dict), str(to.tmp),
                                          async_sharded_save=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        request = request._replace(
            async_fn=partial(_write_then_hash, request.async_fn, str(to.tmp), rank),
            finalize_fns=[*request.finalize_fns, partial(
                self._complete, to, cfg, iteration, extra_files, extra_dirs, rank)])
        self.queue.schedule_async_request(request)
        log(f"checkpoint of iteration {iteration}: being written in the background to "
            f"{to.final}")
        return to.final

    @staticmethod
    def _complete(to, cfg, iteration, extra_files, extra_dirs, rank) -> None:
        path = to.tmp / WRITTEN.format(rank=rank)
        known = json.loads(path.read_text())
        path.unlink()
        store.complete_save(to, cfg, iteration, extra_files, extra_dirs, known)
        log(f"saved checkpoint at iteration {iteration} to {to.final} (written in the "
            "background)")

    def finish(self, wait: bool = False) -> None:
        """Collective: complete the saves whose writers are done (all of them with `wait`)."""
        self.queue.maybe_finalize_async_calls(blocking=wait)

    @property
    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def close(self) -> None:
        """Collective: every save complete, the queue's resources released."""
        self.finish(wait=True)
        self.queue.close()
