"""Hostile HF folders through the real tools, under an address-space limit of 1.5 GB above
what the process uses once its imports and process groups exist. Prints one JSON line per
case: its return code, the tool's output, seconds, and whether anything was saved.

    python tests/integration/hostile_import.py TINY_PHI_HF_FOLDER WORK_FOLDER
"""

import contextlib
import io
import json
import resource
import shutil
import struct
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's tools/

from tools import convert_hf_to_mcore, upcycle_to_moe  # noqa: E402


def _weights(folder: Path, entries: list) -> None:
    """model.safetensors written by hand from [name, dtype, shape, bytes, offsets] entries:
    the header says what the entries say, whatever the bytes are."""
    header, data = {}, b""
    for name, dtype, shape, raw, offsets in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        data += raw
    head = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)


def _entries(tensors: dict) -> list:
    """[name, dtype, shape, bytes, offsets] of each tensor, laid out as the format says."""
    out, at = [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        out.append([name, "F32", list(t.shape), raw, [at, at + len(raw)]])
        at += len(raw)
    return out


def cases(base: Path, work: Path):
    tensors = load_file(str(base / "model.safetensors"))

    def variant(name):
        folder = work / name
        shutil.copytree(base, folder)
        return folder

    def weights_case(name, mutate):
        folder = variant(name)
        entries = _entries(tensors)
        mutate(entries)
        _weights(folder, entries)
        return folder

    def overlap(entries):  # two tensors of one shape on the same bytes
        q0 = next(e for e in entries if e[0].endswith("layers.0.self_attn.q_proj.weight"))
        q1 = next(e for e in entries if e[0].endswith("layers.1.self_attn.q_proj.weight"))
        q1[4] = list(q0[4])

    def hole(entries):  # eight bytes no tensor owns, before the last tensor
        entries[-1][3] = bytes(8) + entries[-1][3]
        entries[-1][4] = [entries[-1][4][0] + 8, entries[-1][4][1] + 8]

    def wrong_shape(entries):  # the header's shape disagrees with its byte range
        entries[0][2] = [entries[0][2][0] + 1, *entries[0][2][1:]]

    yield "overlap", [], weights_case("overlap", overlap)
    yield "hole", [], weights_case("hole", hole)
    yield "shape_vs_bytes", [], weights_case("shape_vs_bytes", wrong_shape)
    nested = variant("nested_json")
    head = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (nested / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head)
    yield "nested_json", [], nested
    config = json.loads((base / "config.json").read_text())
    heads = config["num_attention_heads"]
    for key, value in (("hidden_size", heads * 10**8), ("num_hidden_layers", 10**7),
                       ("vocab_size", 10**9), ("intermediate_size", 10**9)):
        folder = variant(f"config_{key}")
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        yield f"config_{key}", [], folder
    folder = variant("no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    yield "no_tokenizer", [], folder
    yield "no_tokenizer_allowed", ["--no-tokenizer"], folder
    folder = variant("corrupt_tokenizer")
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    yield "corrupt_tokenizer", [], folder


def run(tool, argv):
    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = tool.main(argv)
        except BaseException as e:  # noqa: BLE001 - what escaped the tool is the finding
            rc = f"raised {type(e).__name__}: {e}"
    return rc, err.getvalue() + out.getvalue(), time.perf_counter() - start


def main():
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.runtime import parallel

    base, work = Path(sys.argv[1]), Path(sys.argv[2])
    # one set of process groups for every case (each tool would make its own, and gloo's
    # threads would spend the address space this test limits)
    parallel.initialize(ParallelConfig())
    parallel.initialize = lambda *args, **kwargs: None
    used = int(next(line.split()[1] for line in open("/proc/self/status")
                    if line.startswith("VmSize:"))) * 1024
    limit = used + (3 << 29)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for name, flags, folder in cases(base, work):
        save = work / f"{name}_ckpt"
        rc, err, seconds = run(convert_hf_to_mcore,
                               ["--hf-dir", str(folder), "--save", str(save), "--no-progress",
                                *flags])
        saved = save.exists() and any(p.name != "medmoe.lock" for p in save.iterdir())
        print(json.dumps({"case": name, "rc": rc, "err": err, "seconds": seconds,
                          "saved": saved}), flush=True)
    save = work / "upcycled"
    rc, err, seconds = run(upcycle_to_moe, ["--load", str(work / "no_tokenizer_allowed_ckpt"),
                                            "--save", str(save), "--num-experts", "1000000",
                                            "--moe-router-type", "learned"])
    print(json.dumps({"case": "upcycle_num_experts", "rc": rc, "err": err, "seconds": seconds,
                      "saved": save.exists()}), flush=True)


if __name__ == "__main__":
    main()
