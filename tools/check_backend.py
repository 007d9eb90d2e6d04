"""The user's own proof before turning Transformer Engine on (`--transformer-impl
transformer_engine`): one checkpoint, both backends, the same logits and a stage-3 step timed.

    python tools/check_backend.py                        # tiny and Phi-2 width (4 layers)
    python tools/check_backend.py --sizes tiny           # seconds
    torchrun --nproc_per_node 1 tools/check_backend.py   # the same under torchrun

For each size it builds a random Med-MoE language model (4 experts, top-2 + meta expert, every
other layer) with the local backend, saves it as a checkpoint, loads that checkpoint into a
model of each backend (local, and Transformer Engine when it is installed; otherwise local
again, and the output says TE is absent), compares their logits on the same tokens in float32
and in bf16, and times one stage-3 training step of each (bf16 on a GPU; float32 on CPU, where
Megatron's mixed-precision optimizer cannot run). The last line is one JSON object: the
differences, tokens/s of each backend and a verdict (`same`: every difference within its
tolerance; `differs` otherwise, with the figures to look at).
"""

import argparse
import json
import sys
import tempfile
import time

SIZES = ("tiny", "phi2-4l")
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # relative to the logits' largest magnitude


def size_config(name: str, impl: str, dtype: str):
    import dataclasses

    from medmoe_mcore.config.flavors import medmoe_language
    from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig

    lm = medmoe_language("tiny" if name == "tiny" else "phi2")
    if name == "phi2-4l":
        lm = dataclasses.replace(lm, num_layers=4)
    return ModelConfig(language=lm, moe=MoEConfig(num_experts=4, router_topk=2),
                       parallel=ParallelConfig(transformer_impl=impl), params_dtype=dtype)


def logits(cfg, folder, tokens):
    import torch

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.models.medmoe import build_model
    from medmoe_mcore.runtime import parallel

    model = build_model(cfg).to(parallel.device())
    store.load_into(model, folder)
    model.eval()
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    with torch.no_grad():
        return model(tokens, positions, None).float()


def step_tokens_per_s(cfg, folder, tokens, steps: int) -> float:
    import torch

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training import setup as training_setup
    from medmoe_mcore.training.config import TrainConfig

    train = TrainConfig(stage=3, train_iters=100, lr=1e-5)
    model, trainable = training_setup.stage_model(cfg, train)
    store.load_into(model, folder)
    setup = training_setup.wrap(model, trainable, cfg, train)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    sync = torch.cuda.synchronize if tokens.is_cuda else (lambda: None)
    training_setup.token_step(setup, tokens, positions)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        training_setup.token_step(setup, tokens, positions)
    sync()
    seconds = (time.perf_counter() - start) / steps
    del setup, model
    parallel.log(f"  step: {seconds:.3f} s")
    return round(tokens.numel() / seconds, 1)


def check_size(name, other, args) -> dict:
    import gc

    import torch

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.models.medmoe import build_model
    from medmoe_mcore.runtime import parallel

    device = parallel.device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    folder = f"{args.work_dir}/{name}"
    cfg = size_config(name, "local", "float32")
    store.save(build_model(cfg).sharded_state_dict(), folder, cfg, overwrite=True)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.language.vocab_size, (1, args.seq_length),
                           generator=gen).to(device)
    result = {}
    for dtype in ("float32", "bfloat16"):
        parallel.log(f"{name}: logits in {dtype}, local vs {other}")
        a = logits(size_config(name, "local", dtype), folder, tokens)
        b = logits(size_config(name, other, dtype), folder, tokens)
        scale = float(a.abs().max())
        result[f"max_abs_logit_diff_{dtype}"] = float((a - b).abs().max())
        result[f"relative_{dtype}"] = result[f"max_abs_logit_diff_{dtype}"] / max(scale, 1e-12)
        del a, b
        gc.collect()
    step_dtype = "bfloat16" if on_gpu else "float32"
    result["step_dtype"] = step_dtype
    result["tokens_per_s"] = {}
    for label, impl in (("local", "local"), ("other", other)):
        parallel.log(f"{name}: a stage-3 step in {step_dtype} ({impl})")
        result["tokens_per_s"][label] = step_tokens_per_s(
            size_config(name, impl, step_dtype), folder, tokens, args.steps)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    result["same"] = all(result[f"relative_{d}"] <= TOLERANCE[d] for d in TOLERANCE)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {SIZES}")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed training steps per backend")
    p.add_argument("--work-dir", help="where the checkpoints go (default: a temporary folder)")
    args = p.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        p.error(f"--sizes {args.sizes}: choose from {', '.join(SIZES)}")

    from medmoe_mcore.config.model import ParallelConfig, transformer_engine_importable
    from medmoe_mcore.runtime import parallel

    te = transformer_engine_importable()
    other = "transformer_engine" if te else "local"
    started = parallel.started()
    parallel.initialize(ParallelConfig(), seed=1)
    if not te:
        parallel.log("Transformer Engine is not installed here: checking local against local "
                     "(the same checkpoint loaded twice)")
    with tempfile.TemporaryDirectory() as tmp:
        args.work_dir = args.work_dir or tmp
        report = {name: check_size(name, other, args) for name in sizes}
    verdict = "same" if all(r["same"] for r in report.values()) else "differs"
    parallel.log(json.dumps({"transformer_engine_installed": te, "compared": ["local", other],
                             "tolerance_relative": TOLERANCE, "sizes": report,
                             "verdict": verdict}))
    parallel.finish(tear_down=not started)
    return 0 if verdict == "same" else 1


if __name__ == "__main__":
    sys.exit(main())
