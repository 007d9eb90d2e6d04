"""Memory and speed of the training data path (megatron-energon loader, data/loader.py).

1. Writes synthetic datasets through the real preparation code (records.write_shards: every
   image checked, energon index written): N records each, 336x336 JPEG images (a pool of
   distinct pictures; every record carries its own copy in the shards), VQA-style text.
2. In a fresh process per run (so peak RSS is that run's alone): reads `--samples` samples of
   one dataset as training does (data/loader.py `training_batches`) with CLIP-336
   preprocessing, reporting samples/s (after the first micro-batch) and the peak RSS of the
   reading process (a training rank), of its loader's helper process and of a worker.
3. With `--train-from CKPT` (e.g. medmoe_demo/checkpoints/init after the main job), a short
   stage-2 run of that (tiny) model on the largest dataset per worker count: the share of step
   time spent waiting for data (the training log's `data wait (%)`).

    python tools/bench_data.py --work /tmp/bench_data --records 1000 50000 --workers 0 1 2 \\
        --train-from medmoe_demo/checkpoints/init

Prints one JSON line per measurement.
"""

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("What imaging modality is used?", "Is there an abnormality?",
             "Which organ is shown?", "Is this image normal?")


def synthetic_images(count: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):  # smooth shapes plus noise: JPEG sizes like real scans (~20-40 KB)
        low = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def prepare(folder: Path, records: int, pool: list[bytes]) -> dict:
    from medmoe_mcore.data.records import write_shards

    if (folder / ".nv-meta" / ".info.json").exists():
        return {"prepared": str(folder), "records": records, "reused": True}
    start = time.time()

    def rows():
        for i in range(records):
            yield {"id": f"syn-{i}", "image": f"{i % len(pool)}.jpg",
                   "conversations": [
                       {"from": "human", "value": f"<image>\n{QUESTIONS[i % 4]}"},
                       {"from": "gpt", "value": f"Synthetic answer number {i}."}]}

    report = write_shards(rows(), lambda r: pool[int(r["image"].split(".")[0])], folder,
                          total=records, show_progress=False)
    size = sum(p.stat().st_size for p in folder.glob("*.tar"))
    return {"prepared": str(folder), "records": report.written, "shards_gb": size / 1e9,
            "seconds": time.time() - start}


class _PeakRss:
    """Peak RSS (MB) by role of this process and its descendants: with workers, the loader
    runs in a helper process (started from a forkserver, data/loader_process.py) whose
    children are energon's workers. Sampled between micro-batches (psutil)."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.peak = {"rank": 0.0, "helper": 0.0, "worker": 0.0}

    def sample(self) -> None:
        self._see("rank", self.me)
        for server in self.me.children():  # the forkserver
            for helper in server.children():
                self._see("helper", helper)
                for worker in helper.children():
                    self._see("worker", worker)

    def _see(self, role, process) -> None:
        try:
            self.peak[role] = max(self.peak[role], process.memory_info().rss / 2**20)
        except Exception:  # noqa: BLE001 - a process that just ended
            pass


def measure(folder: Path, tokenizer: Path, workers: int, samples: int, mbs: int) -> dict:
    """One run's loader throughput and peak memory (call in a fresh process)."""
    from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
    from medmoe_mcore.config.model import ModelConfig
    from medmoe_mcore.conventions import DEFAULT_SEED
    from medmoe_mcore.data.blend import data_blend
    from medmoe_mcore.data.loader import MedMoETaskEncoder, training_batches
    from medmoe_mcore.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    cfg = ModelConfig(language=medmoe_language("tiny"),
                      vision=vision_flavor("phi2", tok.image_token_id))  # CLIP-336 images
    rss = _PeakRss()
    rss.sample()
    rss_before = rss.peak["rank"]
    batches = training_batches(data_blend(str(folder)), MedMoETaskEncoder(tok, "phi", 1024, cfg),
                               mbs, 0, 1, workers, seed=DEFAULT_SEED)
    batches.next()  # workers started, first micro-batch in
    start = time.perf_counter()
    for i in range(samples // mbs - 1):
        batches.next()
        if i % 10 == 0:
            rss.sample()
    seconds = time.perf_counter() - start
    rss.sample()
    batches.close()
    return {"folder": str(folder), "workers": workers, "samples": samples,
            "samples_per_s": (samples - mbs) / seconds,
            "peak_rss_mb": max(rss.peak["rank"],
                               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_loader_mb": rss_before,
            "peak_rss_helper_mb": rss.peak["helper"], "peak_rss_worker_mb": rss.peak["worker"]}


def train_wait(folder: Path, start: Path, tokenizer: Path, workers: int, iters: int,
               work: Path) -> dict:
    """A short stage-2 run (one process): mean `data wait (%)` of its log lines, the first
    (start-up) left out."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           str(ROOT / "examples" / "pretrain_medmoe.py"), "--stage", "2", "--data-path",
           str(folder), "--pretrained-checkpoint", str(start), "--tokenizer", str(tokenizer),
           "--train-iters", str(iters),
           "--lr", "1e-4", "--micro-batch-size", "4", "--global-batch-size", "8",
           "--seq-length", "96", "--log-interval", "5", "--num-workers", str(workers)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    lines = [line for line in r.stdout.splitlines() if "data wait (%):" in line]
    waits = [float(line.split("data wait (%): ")[1].split(" |")[0]) for line in lines]
    ms = [float(line.split("per iteration (ms): ")[1].split(" |")[0]) for line in lines]
    return {"train_workers": workers, "iterations": iters,
            "data_wait_percent": sum(waits[1:]) / max(len(waits) - 1, 1),
            "ms_per_iteration": sum(ms[1:]) / max(len(ms) - 1, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="/tmp/medmoe_bench_data")
    p.add_argument("--records", type=int, nargs="+", default=[1000, 50000])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=2000, help="samples read per run")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--image-pool", type=int, default=256, help="distinct synthetic pictures")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: --train-from's tokenizer/)")
    p.add_argument("--train-from", default=None, help="checkpoint for the training runs")
    p.add_argument("--train-iters", type=int, default=30)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    tokenizer = args.tokenizer or (args.train_from and str(Path(args.train_from) / "tokenizer"))
    if not tokenizer:
        p.error("--tokenizer or --train-from is needed (the text is tokenised as in training)")
    if args.measure:
        print(json.dumps(measure(Path(args.measure), Path(tokenizer), args.workers[0],
                                 args.samples, args.micro_batch_size)), flush=True)
        return
    pool = synthetic_images(args.image_pool, 336)
    folders = {n: work / f"records-{n}" for n in args.records}
    for n, folder in folders.items():
        print(json.dumps(prepare(folder, n, pool)), flush=True)
    for n, folder in folders.items():
        for w in args.workers:
            r = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--workers",
                                str(w), "--samples", str(args.samples), "--tokenizer",
                                str(tokenizer), "--micro-batch-size",
                                str(args.micro_batch_size)], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            print(json.dumps({"records": n, **json.loads(r.stdout.splitlines()[-1])}),
                  flush=True)
    if args.train_from:
        largest = folders[max(folders)]
        for w in args.workers:
            print(json.dumps({"records": max(folders), **train_wait(
                largest, Path(args.train_from).resolve(), Path(tokenizer).resolve(), w,
                args.train_iters, work)}),
                flush=True)


if __name__ == "__main__":
    main()
