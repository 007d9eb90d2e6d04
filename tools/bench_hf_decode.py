"""Decoding against HF transformers on the same weights: a randomly initialised Med-MoE model of
a flavor (dense, or with Med-MoE layers) is saved, exported (dense: a plain
`LlavaForConditionalGeneration` folder; Med-MoE: the release folder with our remote code) and
loaded back by transformers; both generate greedily from the same prompt and image at each
batch size, without stopping at EOS. Ours runs twice: Megatron's static inference path, and
the static decode step (`--enable-cuda-graph`: captured as a CUDA graph on a GPU, eager on CPU).
Prints one JSON line per batch size (tokens/s of each, the ratios) and one with the first
--compare greedy tokens of each at batch 1.

    python tools/bench_hf_decode.py --flavor tiny                          # CPU, quick
    python tools/bench_hf_decode.py --flavor phi2 --bf16 [--num-experts 4 --moe-router-topk 2]

Ours is tools/generate.py's path (checkpoint loaded by `load_for_inference`, Megatron-Core's
static KV cache, prefill then one token per step); theirs is `generate` with its default cache.
The work folder (checkpoint and export) is a temporary one under --work-dir, removed at the end.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flavor", default="tiny")
    p.add_argument("--num-experts", type=int, default=0, help="0: dense")
    p.add_argument("--moe-router-topk", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compare", type=int, default=16, help="greedy tokens compared at batch 1")
    p.add_argument("--work-dir", default=None, help="where the temporary folder goes")
    args = p.parse_args(argv)

    import torch

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
    from medmoe_mcore.config.model import ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.data.images import preprocess
    from medmoe_mcore.data.tokenizer import train_bpe
    from medmoe_mcore.demo.medical_images import BY_NAME
    from medmoe_mcore.inference.config import GenerationConfig
    from medmoe_mcore.inference.engine import generate, load_for_inference
    from medmoe_mcore.models.medmoe import MedMoEModel
    from medmoe_mcore.runtime import parallel

    parallel.initialize(ParallelConfig(), seed=0)
    dev = parallel.device()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        tok = train_bpe(["what modality is this image", "a chest x-ray", "an axial ct slice"],
                        work / "tokenizer", vocab_size=300)
        moe = MoEConfig(num_experts=args.num_experts, router_topk=args.moe_router_topk,
                        renormalize=args.moe_router_topk == 2) if args.num_experts else None
        cfg = ModelConfig(language=medmoe_language(args.flavor), moe=moe,
                          vision=vision_flavor(args.flavor, tok.image_token_id),
                          params_dtype="bfloat16" if args.bf16 else "float32").validate()
        torch.manual_seed(0)
        store.save(MedMoEModel(cfg).to(dev).sharded_state_dict(), work / "ckpt", cfg,
                   extra_dirs={store.TOKENIZER: work / "tokenizer"})
        if moe is None:
            from medmoe_mcore.conversion.llava import export_llava

            export_llava(work / "ckpt", work / "hf", show_progress=False)
        else:
            from medmoe_mcore.conversion.release import export_release

            export_release(work / "ckpt", work / "hf", show_progress=False)
        image = preprocess(BY_NAME["RG1_UNCI"].load(), cfg.vision, train=False).unsqueeze(0)
        prompt = [5, 6, 7, tok.image_token_id, 8, 9, 10, 11, 12]
        gen = GenerationConfig(max_new_tokens=args.new_tokens).validate()

        model, _ = load_for_inference(work / "ckpt", ParallelConfig(), bf16=args.bf16)

        def ours(batch: int, n: int, graphs: bool) -> tuple[list[list[int]], float]:
            g = GenerationConfig(max_new_tokens=n, enable_cuda_graph=graphs).validate()
            images = image.to(dev, dtype).repeat(batch, 1, 1, 1)
            sync()
            start = time.perf_counter()
            out = generate(model, [prompt] * batch, images, eos_id=-1, gen=g)
            sync()
            return out, time.perf_counter() - start

        ours(1, 2, False), ours(1, 2, True)  # warm-up
        mine = {b: ours(b, gen.max_new_tokens, False) for b in args.batch_sizes}
        graphed = {b: ours(b, gen.max_new_tokens, True) for b in args.batch_sizes}
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        hf = _hf_model(work / "hf", moe is None, dtype).to(dev).eval()
        hf.generation_config.eos_token_id = None  # never stop early, never mask EOS
        hf.generation_config.pad_token_id = 0
        expanded = []
        for t in prompt:
            expanded += [t] * cfg.vision.num_patches if t == tok.image_token_id else [t]
        ids = torch.tensor([expanded], device=dev)

        def theirs(batch: int, n: int) -> tuple[list[list[int]], float]:
            pixels = image.to(dev, dtype).repeat(batch, 1, 1, 1)
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(input_ids=ids.repeat(batch, 1), pixel_values=pixels,
                                  attention_mask=torch.ones_like(ids.repeat(batch, 1)),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False)
            sync()
            return out[:, ids.shape[1]:].tolist(), time.perf_counter() - start

        theirs(1, 2)  # warm-up
        for b in args.batch_sizes:
            (_, t_ours), (_, t_graph), (_, t_hf) = mine[b], graphed[b], theirs(
                b, gen.max_new_tokens)
            n = b * gen.max_new_tokens
            print(json.dumps({"flavor": args.flavor, "experts": args.num_experts,
                              "dtype": str(dtype).split(".")[-1], "device": str(dev),
                              "batch": b, "new_tokens": gen.max_new_tokens,
                              "ours_tokens_per_s": round(n / t_ours, 1),
                              "ours_graphs_tokens_per_s": round(n / t_graph, 1),
                              "hf_tokens_per_s": round(n / t_hf, 1),
                              "ours_over_hf": round(t_hf / t_ours, 2),
                              "ours_graphs_over_hf": round(t_hf / t_graph, 2)}), flush=True)
        first = min(args.batch_sizes)
        a, s = (runs[first][0][0][:args.compare] for runs in (mine, graphed))
        h = theirs(1, args.compare)[0][0]
        print(json.dumps({"compare": args.compare, "equal_prefix": _equal_prefix(a, h),
                          "graphs_equal_prefix": _equal_prefix(s, h), "ours": a,
                          "ours_graphs": s, "hf": h}), flush=True)
    return 0


def _equal_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _hf_model(folder: Path, dense: bool, dtype):
    """The export through plain transformers: LLaVA's own class for a dense model, our remote
    code (shipped in the release folder) for Med-MoE."""
    if dense:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)


if __name__ == "__main__":
    sys.exit(main())
