"""The GPU suite: on one CUDA GPU, the project's benchmarks at the shapes that matter, in one
command, each part in a process of its own with its own time limit; writes `gpu_report.json`
(every figure, the GPU, the date, the commands) and `gpu_report.md` (tables to paste into
docs/benchmarks.md).

    python tools/bench_gpu.py --out gpu_report        # on an offline GPU node (docs/gpu.md)

Parts:
  step_grouped / step_sequential: tools/bench_step.py at Phi-2 width (hidden 2560, FFN 10240,
      32 heads, 8 layers of which 4 Med-MoE, 4 experts top-2 + meta expert, vocabulary 51200,
      sequence 2048, micro-batch 4, bf16): the dense stage-2 step and the stage-3 step,
      tokens/s, TFLOP/s, MFU against the GPU's bf16 dense peak, peak memory; grouped experts
      (--moe-grouped-gemm) on, then off.
  moe_layer: tools/bench_moe.py at Phi-2 width, 8192 tokens, bf16, E = 4, 16, 64, balanced and
      skewed routing: grouped and sequential experts, Megatron's SequentialMLP and the authors'
      DeepSpeed-style layer, each against the k + 1 dense FFNs it must compute.
  decode_profile: tools/bench_decode.py, the Phi-2-shaped dense model in bf16 at batch 1 and 8:
      ms per token, tokens/s, the share of a step the GPU is busy and its kernel launches.
  decode_vs_hf_dense / decode_vs_hf_moe: tools/bench_hf_decode.py, Phi-2-shaped dense and Med-MoE
      (4 experts top-2 + meta expert) in bf16, 64 new tokens at batch 1 and 8: ours against
      HF transformers `generate` on the same exported weights (dense: plain
      LlavaForConditionalGeneration; Med-MoE: the release's remote code), tokens/s side by side
      and the first 16 greedy tokens compared; ours with and without the CUDA-graph decode step.
  memory_full: tools/plan_memory.py --measure, the full 32-layer Phi-2 Med-MoE language model
      in stage 3 at micro-batch 2 x 2048 (bf16): torch's peak against the memory model's plan.
      Full fine-tuning needs ~103 GB on one GPU: on a GPU with less than 120 GiB the part runs
      with LoRA rank 128 instead, and says so.

A machine without CUDA is refused before anything runs.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = ["-m", "torch.distributed.run", "--nproc_per_node", "1", "tools/bench_step.py", "--bf16",
        "--vocab-size", "51200", "--seq-length", "2048", "--micro-batch-size", "4",
        "--num-layers", "8", "--hidden-size", "2560", "--ffn-hidden-size", "10240",
        "--num-attention-heads", "32", "--expert-model-parallel-size", "1", "--num-experts",
        "4", "--moe-router-topk", "2", "--steps", "3"]
DECODE = ["tools/bench_decode.py", "--flavor", "phi2", "--bf16", "--positions", "16", "256",
          "--batch-sizes", "1", "8", "--profile"]
MEMORY = ["tools/plan_memory.py", "--flavor", "phi2", "--stage", "3", "--micro-batch-size", "2",
          "--seq-length", "2048", "--text-only", "--measure"]
FULL_FINE_TUNING_GIB = 120  # below this much GPU memory the memory part runs with LoRA
# name: (arguments after `python`, seconds allowed)
MOE = ["tools/bench_moe.py", "--hidden", "2560", "--ffn", "10240", "--tokens", "8192",
       "--num-experts", "4,16,64", "--dtype", "bfloat16", "--repeats", "5"]
HF_DECODE = ["tools/bench_hf_decode.py", "--flavor", "phi2", "--bf16", "--batch-sizes", "1", "8",
             "--new-tokens", "64"]
PARTS = {
    "step_grouped": (STEP + ["--moe-grouped-gemm"], 90),
    "step_sequential": (STEP + ["--no-moe-grouped-gemm"], 90),
    "moe_layer": (MOE, 60),
    "decode_profile": (DECODE, 45),
    "decode_vs_hf_dense": (HF_DECODE, 75),
    "decode_vs_hf_moe": (HF_DECODE + ["--num-experts", "4", "--moe-router-topk", "2"], 75),
    "memory_full": (MEMORY, 45),
}
OPEN: list[str] = []


def json_lines(text: str) -> list[dict]:
    """The JSON objects a benchmark printed, one per line (after any log prefix)."""
    found = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            value = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def run_part(name: str, arguments: list[str], limit: int) -> dict:
    command = [sys.executable, *arguments]
    print(f"[bench_gpu] {name}: {' '.join(arguments)} (at most {limit} s)", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", e.stderr or ""
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    seconds = round(time.perf_counter() - start, 1)
    part = {"command": "python " + " ".join(arguments), "rc": rc, "seconds": seconds,
            "results": json_lines(out)}
    if rc != 0:
        part["tail"] = (out + err)[-3000:]
    print(f"[bench_gpu] {name}: rc {rc} in {seconds} s, {len(part['results'])} results",
          flush=True)
    return part


def markdown(report: dict) -> str:
    rows = [f"GPU: {report['gpu']}, {report['date']}, torch {report['torch']}; "
            f"`{report['command']}`", "",
            "| part | step | tokens/s | TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    for name in ("step_grouped", "step_sequential"):
        for r in report["parts"].get(name, {}).get("results", []):
            if "step" in r:
                tflops = r["flops_all_ranks"] / r["step_s"] / 1e12
                rows.append(f"| {name} | {r['step']} (E={r['num_experts']}) | "
                            f"{r['tokens_per_s']:.0f} | {tflops:.0f} | {r['mfu']} | "
                            f"{r['peak_memory_gib_max_rank']} |")
            elif "time_over_flop_ratio" in r:
                rows.append(f"| {name} | stage 3 / stage 2: time {r['time_ratio']}x, FLOPs "
                            f"{r['flop_ratio']}x, ratio {r['time_over_flop_ratio']} | | | | |")
    rows += ["", "| E | regime | grouped / dense | sequential / dense | Megatron / dense | "
             "DeepSpeed-style / dense |", "|---|---|---|---|---|---|"]
    for r in report["parts"].get("moe_layer", {}).get("results", []):
        rows.append(f"| {r['experts']} | {r['regime']} | {r['grouped_vs_dense']} | "
                    f"{r['medmoe_vs_dense']} | {r['megatron_vs_dense']} | "
                    f"{r['reference_vs_dense']} |")
    rows += ["", "| part | batch | ms per step | tokens/s | GPU busy | kernels per step |",
             "|---|---|---|---|---|---|"]
    for name in ("decode_profile",):
        results = report["parts"].get(name, {}).get("results", [])
        busy = {r["batch"]: r for r in results if "device_busy_share" in r}
        for r in (r for r in results if "tokens_per_s" in r):
            b = busy.get(r["batch"], {})
            rows.append(f"| {name} | {r['batch']} | {r['ms_per_step']} | {r['tokens_per_s']} | "
                        f"{b.get('device_busy_share')} | {b.get('kernels_per_step')} |")
    rows += ["", "| part | batch | ours tokens/s | ours, CUDA graph | HF generate tokens/s | "
             "ours / HF | graphed / HF |", "|---|---|---|---|---|---|---|"]
    for name in ("decode_vs_hf_dense", "decode_vs_hf_moe"):
        for r in report["parts"].get(name, {}).get("results", []):
            if "batch" in r:
                rows.append(f"| {name} | {r['batch']} | {r['ours_tokens_per_s']} | "
                            f"{r['ours_graphs_tokens_per_s']} | {r['hf_tokens_per_s']} | "
                            f"{r['ours_over_hf']} | {r['ours_graphs_over_hf']} |")
            elif "equal_prefix" in r:
                rows.append(f"| {name} | greedy tokens equal to HF: {r['equal_prefix']} "
                            f"(graphed {r['graphs_equal_prefix']}) of {r['compare']} | | | | "
                            "| |")
    mode = report.get("memory_full_mode", "full fine-tuning")
    for r in report["parts"].get("memory_full", {}).get("results", []):
        if "measured_peak_gib" in r:
            rows += ["", f"Memory, full 32-layer stage 3 ({mode}): measured "
                     f"{r['measured_peak_gib']} GiB, plan {r['plan_text_only_gib']['total']} "
                     f"GiB, plan / measured {r['plan_over_measured']}"]
    failed = [f"{n} (rc {p['rc']})" for n, p in report["parts"].items() if p["rc"] != 0]
    rows += ["", "Failed parts: " + (", ".join(failed) or "none"),
             "Open (not in the suite yet): " + ("; ".join(report["open"]) or "nothing")]
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="gpu_report", help="report path without suffix")
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("tools/bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}); run it on a GPU node (docs/gpu.md)", file=sys.stderr)
        return 2
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(),
              "command": "python tools/bench_gpu.py " + " ".join(argv or sys.argv[1:]),
              "parts": {}, "open": OPEN}
    out = Path(args.out)
    parts = dict(PARTS)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    if memory_gib < FULL_FINE_TUNING_GIB:
        parts["memory_full"] = (MEMORY + ["--lora-rank", "128"], PARTS["memory_full"][1])
        report["memory_full_mode"] = f"LoRA rank 128 ({memory_gib:.0f} GiB GPU)"
    for name in args.parts:
        report["parts"][name] = run_part(name, *parts[name])
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))  # kept if cut short
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(part["rc"] == 0 for part in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
