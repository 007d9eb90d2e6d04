"""Conversion benchmark on a full-size Phi-2-shaped checkpoint with random bf16 weights.

    python tools/bench_conversion.py --work-dir /tmp/bench_conv [--hf-dir EXISTING_HF]

Builds (unless --hf-dir is given) hidden 2560 x 32 layers x vocab 51200 (~2.8B parameters,
~5.6 GB), then times HF -> Megatron and Megatron -> HF, each in a fresh process, and reports
seconds, MB/s and the true peak memory of that process and its helpers: the PSS of the whole
process tree, sampled every 50 ms (shared pages counted once), relative to the checkpoint
size. Also the cost of the checkpoint's checksums (integrity.py: SHA-256 of every file,
recorded by the save, verified before a load). The round trip is checked bit-exact. Prints
one JSON object as its last line.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build_random_phi2(folder: Path, layers: int, seed: int = 0) -> None:
    import torch
    from transformers import PhiConfig

    from medmoe_mcore.conversion.safetensors_io import write_sharded

    cfg = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                    num_hidden_layers=layers, num_attention_heads=32, partial_rotary_factor=0.4,
                    max_position_embeddings=2048, hidden_act="gelu_new")
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,)})
        for n in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes.update({p + f"self_attn.{n}.weight": (h, h), p + f"self_attn.{n}.bias": (h,)})
        shapes.update({p + "mlp.fc1.weight": (f, h), p + "mlp.fc1.bias": (f,),
                       p + "mlp.fc2.weight": (h, f), p + "mlp.fc2.bias": (h,)})
    shapes.update({"model.final_layernorm.weight": (h,), "model.final_layernorm.bias": (h,),
                   "lm_head.weight": (v, h), "lm_head.bias": (v,)})
    gen = torch.Generator().manual_seed(seed)

    def tensors():
        for key, shape in shapes.items():
            yield key, torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)

    folder.mkdir(parents=True)
    write_sharded(tensors(), folder, max_shard_bytes=2 << 30)
    cfg.save_pretrained(str(folder))


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tree_pss(root_pid: int) -> int:
    """Proportional set size of a process and all its descendants now (bytes): shared pages
    are split between the processes that map them, so the sum is the tree's true use."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_step(step: str, src: str, dst: str, interval: float = 0.05) -> dict:
    """Run one conversion in a fresh process; return its time and the peak of its process
    tree's PSS, sampled every `interval` seconds while it runs."""
    code = ("import sys, time, json\n"
            "t = time.perf_counter()\n"
            f"from medmoe_mcore.conversion.language import {'import_hf' if step == 'import' else 'export_hf'} as f\n"
            "from medmoe_mcore.config.model import ParallelConfig\n"
            "from medmoe_mcore.runtime import parallel\n"
            "parallel.initialize(ParallelConfig())\n"
            "t_import = time.perf_counter()\n"
            f"f({src!r}, {dst!r}, show_progress=False"
            f"{', tokenizer=False' if step == 'import' else ''})\n"  # weights alone
            "print(json.dumps({'seconds': time.perf_counter() - t_import,\n"
            "  'startup_seconds': t_import - t}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(interval)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(err[-3000:])
    r = json.loads(out.strip().splitlines()[-1])
    r["peak_pss_bytes"] = peak
    return r


def checksum_seconds(folder: Path) -> dict:
    """What integrity records cost: hashing every file of the checkpoint once (a save records,
    a load verifies the same bytes), single process."""
    from medmoe_mcore.checkpoint import integrity

    t = time.perf_counter()
    assert integrity.verify(folder)
    seconds = time.perf_counter() - t
    return {"verify_seconds": seconds, "verify_gb_per_s": dir_bytes(folder) / 1e9 / seconds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/medmoe_bench_conversion")
    p.add_argument("--hf-dir", help="use this HF folder instead of building a random Phi-2")
    p.add_argument("--num-layers", type=int, default=32, help="layers of the random model")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    args = p.parse_args(argv)

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hf = Path(args.hf_dir) if args.hf_dir else work / "hf"
    if not args.hf_dir:
        t = time.perf_counter()
        build_random_phi2(hf, args.num_layers)
        print(f"built random Phi-2-shaped model in {time.perf_counter() - t:.1f}s", flush=True)
    size = dir_bytes(hf)
    result = {"checkpoint_bytes": size}
    for step, src, dst in (("import", hf, work / "mcore"), ("export", work / "mcore", work / "hf_out")):
        r = run_step(step, str(src), str(dst))
        r["mb_per_s"] = size / 1e6 / r["seconds"]
        r["peak_pss_over_checkpoint"] = r["peak_pss_bytes"] / size
        result[step] = r
        print(f"{step}: {r['seconds']:.1f}s, {r['mb_per_s']:.0f} MB/s, peak PSS of the process "
              f"tree {r['peak_pss_bytes'] / 2**30:.2f} GiB = {r['peak_pss_over_checkpoint']:.2f}x",
              flush=True)
        if step == "import":
            result["checksums"] = checksum_seconds(work / "mcore" / "release")
            print(f"checksums: {result['checksums']}", flush=True)

    import torch

    from medmoe_mcore.conversion.safetensors_io import SafetensorsDir

    a, b = SafetensorsDir(hf), SafetensorsDir(work / "hf_out")
    result["round_trip_bit_exact"] = a.keys() == b.keys() and all(
        torch.equal(a.get(k), b.get(k)) for k in a.keys())
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["round_trip_bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
