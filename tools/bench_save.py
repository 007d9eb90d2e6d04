"""How long a save holds up the step loop: synchronous against `--async-save`.

    python tools/bench_save.py --work-dir /tmp/bench_save      # ~1.7 GB of float32 weights

One process; a dense Phi-2-width model (hidden 2560, vocabulary 51200, `--num-layers` layers)
saved as a training save is (torch_dist, checksums, rename, tracker). Synchronous: the whole
`store.save`. Background: the time the loop spends in `AsyncSaver.save` (planning, the writer's
fork) plus in the finalisation once the writer is done (metadata, small files' checksums,
rename, tracker); the writer's own time runs beside the loop. The last line is one JSON object.
"""

import argparse
import json
import shutil
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    import dataclasses
    from pathlib import Path

    import torch

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.checkpoint.async_save import AsyncSaver
    from medmoe_mcore.config.flavors import medmoe_language
    from medmoe_mcore.config.model import ModelConfig, ParallelConfig
    from medmoe_mcore.models.medmoe import build_model
    from medmoe_mcore.runtime import parallel

    parallel.initialize(ParallelConfig(), seed=1)
    cfg = ModelConfig(language=dataclasses.replace(medmoe_language("phi2"),
                                                   num_layers=args.num_layers))
    model = build_model(cfg)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    sync, loop_wait, writer = [], [], []
    for i in range(args.repeats):
        start = time.perf_counter()
        store.save(model.sharded_state_dict(), work / "sync", cfg, iteration=i + 1)
        sync.append(time.perf_counter() - start)
        saver = AsyncSaver()
        start = time.perf_counter()
        saver.save(model.sharded_state_dict(), work / "async", cfg, iteration=i + 1)
        started = time.perf_counter() - start
        with torch.no_grad():  # the loop goes on (and changes the weights)
            for param in model.parameters():
                param.add_(1.0)
        while saver.queue.async_calls[0].async_caller.process.is_alive():
            time.sleep(0.01)
        written = time.perf_counter() - start
        start = time.perf_counter()
        saver.close()
        loop_wait.append(started + time.perf_counter() - start)
        writer.append(written)
    best = min(range(args.repeats), key=lambda i: sync[i])
    result = {"weights_gb": round(size / 1e9, 2), "sync_save_s": round(min(sync), 2),
              "async_loop_wait_s": round(min(loop_wait), 2),
              "async_writer_s": round(writer[best], 2),
              "loop_wait_over_sync": round(min(loop_wait) / min(sync), 3)}
    parallel.log(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
