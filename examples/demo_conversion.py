"""Main job until the training pipeline lands: a conversion + verification demo on tiny models.

    python examples/demo_conversion.py [--work-dir DIR] [--nproc 2]

For a tiny random Phi-2 and a tiny random StableLM-2 (built offline from HF configs):
HF -> Megatron checkpoint -> HF logits parity at TP=1 and TP=nproc (+SP, torchrun, gloo on CPU)
-> Megatron -> HF export, checked bit-exact against the original. Runs in about a minute on 2
CPU cores; every step is the real command-line tool a user would run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "phi": dict(vocab_size=1001, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=256, partial_rotary_factor=0.4, max_position_embeddings=256),
    "stablelm": dict(vocab_size=997, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=176, partial_rotary_factor=0.25,
                     use_qkv_bias=True, max_position_embeddings=256),
}


def build_tiny(family, folder):
    from transformers import PhiConfig, PhiForCausalLM, StableLmConfig, StableLmForCausalLM

    torch.manual_seed(0)
    cls, cfg = ((PhiForCausalLM, PhiConfig) if family == "phi"
                else (StableLmForCausalLM, StableLmConfig))
    model = cls(cfg(**SHAPES[family]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(folder)


def tool(script, *args, nproc=1):
    cmd = [sys.executable, str(ROOT / "tools" / script), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               str(ROOT / "tools" / script), *args]
    shown = ["torchrun", *cmd[3:]] if nproc > 1 else ["python", *cmd[1:]]
    print("$", " ".join(str(c).replace(str(ROOT) + "/", "") for c in shown), flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"step failed: {script}")
    return proc.stdout.strip().splitlines()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", default=None, help="default: a temporary folder")
    p.add_argument("--nproc", type=int, default=2, help="tensor-parallel size of the TP check")
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="medmoe_demo_"))
    start = time.time()
    summary = {}
    for family in SHAPES:
        hf, ckpt, out = work / f"{family}_hf", work / f"{family}_mcore", work / f"{family}_export"
        print(f"\n== {family}: tiny random HF model -> {hf}", flush=True)
        build_tiny(family, hf)
        tool("convert_hf_to_mcore.py", "--hf-dir", str(hf), "--save", str(ckpt), "--no-progress")
        diffs = {}
        for tp in sorted({1, args.nproc}):
            line = tool("verify_conversion.py", "--hf-dir", str(hf), "--load", str(ckpt),
                        "--tensor-model-parallel-size", str(tp), nproc=tp)[-1]
            result = json.loads(line)
            diffs[f"tp{tp}"] = result["max_abs_logit_diff"]
            print(f"   TP={tp} SP={result['sp']}: max |logit diff| vs HF = "
                  f"{result['max_abs_logit_diff']:.2e}", flush=True)
        tool("convert_mcore_to_hf.py", "--load", str(ckpt), "--hf-dir", str(out),
             "--no-progress", "--overwrite")
        from safetensors.torch import load_file

        a, b = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
        exact = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        print(f"   HF -> Megatron -> HF bit-exact: {exact}", flush=True)
        summary[family] = {"max_abs_logit_diff": diffs, "round_trip_bit_exact": exact}
    ok = all(s["round_trip_bit_exact"] and max(s["max_abs_logit_diff"].values()) < 1e-4
             for s in summary.values())
    print(f"\nartifacts in {work}; {time.time() - start:.0f}s; {'PASSED' if ok else 'FAILED'}")
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
