"""Training throughput with --pack-sequences against padded micro-batches, on the embedded
demo data: the real trainer (examples/pretrain_medmoe.py's Trainer, Megatron DDP and Adam),
stage 2 from the demo's initial checkpoint, on an even blend of the demo's stage-2 and stage-3
shards (87-105 and 59-77 positions per sample: the mix of long and short samples of an
instruction set), each mode in a fresh process.

    python tools/bench_packing.py --work-dir /tmp/bench_packing --seq-length 256 --iters 12

Per mode: the mean step time after `--warmup` steps, samples/s, real tokens/s (each sample's
text and image positions, padding left out) and the share of the computed positions that were
padding. The micro-batch is `--micro-batch-size` rows in both modes: a packed row holds as many
samples as fit in --seq-length, so a packed step reads more samples; `--padded-micro-batch-size`
gives the padded run as many samples per step, to separate what packing saves from what a
larger step amortises. Prints one JSON line per mode and one with the ratios.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class CountingBatches:
    """The trainer's data source, recording each micro-batch's samples and positions."""

    def __init__(self, inner, image_token_id: int, patches: int):
        self.inner, self.image_token_id, self.patches = inner, image_token_id, patches
        self.samples, self.real, self.computed = [], [], []

    def next(self) -> dict:
        from medmoe_mcore.models.flops import spliced_length

        batch = self.inner.next()
        images = 0 if batch["images"] is None else batch["images"].shape[0]
        self.samples.append(batch["samples"])
        self.real.append(sum(batch["lengths"]) + images * (self.patches - 1))
        ids = batch["input_ids"]
        self.computed.append(ids.shape[0] * spliced_length(ids, self.image_token_id,
                                                           self.patches))
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_mode(args) -> dict:
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.demo.pipeline import PipelineConfig, prepare_demo
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.setup import stage_config
    from medmoe_mcore.training.trainer import Trainer

    par = ParallelConfig()
    micro = args.micro_batch_size if args.mode == "packed" else \
        args.padded_micro_batch_size or args.micro_batch_size
    train = TrainConfig(stage=2, train_iters=args.iters, lr=1e-4, seq_length=args.seq_length,
                        micro_batch_size=micro, global_batch_size=micro,
                        num_workers=args.num_workers,
                        log_interval=10 ** 6, pack_sequences=args.mode == "packed")
    parallel.initialize(par, seed=train.seed)
    shards, tok, init = prepare_demo(PipelineConfig(work_dir=args.work_dir), train.seed)
    train.data_path = ["1", str(shards["stage2"]), "1", str(shards["stage3"])]
    train.pretrained_checkpoint = str(init)
    train.tokenizer = str(Path(args.work_dir) / "tokenizer")
    cfg = stage_config(init, par, train)
    trainer = Trainer(cfg, train)
    trainer.data = counting = CountingBatches(trainer.data, cfg.vision.image_token_id,
                                              cfg.vision.num_patches)
    losses = trainer.run()
    timed = slice(args.warmup, None)
    seconds = sum(s for s, _ in trainer.steps[timed])
    steps = len(trainer.steps[timed])
    return {"mode": args.mode, "seq_length": args.seq_length,
            "micro_batch_size": micro, "steps_timed": steps,
            "step_ms": round(1000 * seconds / steps, 1),
            "samples_per_step": round(sum(counting.samples[timed]) / steps, 2),
            "samples_per_s": round(sum(counting.samples[timed]) / seconds, 1),
            "real_tokens_per_s": round(sum(counting.real[timed]) / seconds),
            "padding_share": round(1 - sum(counting.real) / sum(counting.computed), 3),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", default="medmoe_bench_packing",
                   help="the demo's data, tokenizer and initial checkpoint (made if absent)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--padded-micro-batch-size", type=int, default=None,
                   help="rows of the padded run (default: --micro-batch-size)")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--mode", choices=("padded", "packed"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:  # one mode, in this (fresh) process
        print(json.dumps(run_mode(args)), flush=True)
        return 0
    if args.iters <= args.warmup:
        p.error(f"--iters {args.iters}: must be more than --warmup {args.warmup}")
    results = {}
    for mode in ("padded", "packed"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                               "--nproc_per_node", "1", __file__, *(argv or sys.argv[1:]),
                               "--mode", mode], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    padded, packed = results["padded"], results["packed"]
    print(json.dumps({"packed_over_padded": {
        key: round(packed[key] / padded[key], 2)
        for key in ("samples_per_s", "real_tokens_per_s", "step_ms")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
