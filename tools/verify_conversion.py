"""Compare Megatron logits with the HF reference model on the same inputs.

    torchrun --nproc_per_node N tools/verify_conversion.py --hf-dir HF --load CKPT \\
        --tensor-model-parallel-size N

A multimodal checkpoint is compared with HF LlavaForConditionalGeneration on real medical
images from the offline packages (--images, default: a chest X-ray and an IHC slide), one
`<image>` placeholder per image in the prompt (HF gets it expanded to the patch count).

The last line printed (rank 0) is one JSON object with max_abs_logit_diff, tp, ep, ...; the exit
status is 1 when the difference exceeds --tolerance.
"""

import argparse
import json
import sys


def main(argv=None):
    from medmoe_mcore.conventions import DEFAULT_SEED

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--load", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--no-sequence-parallel", action="store_true",
                   help="sequence parallelism is on by default when TP > 1")
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tolerance", type=float, default=None,
                   help="default 1e-4 for float32, 5e-2 x logit scale for bfloat16")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--images", default="RG1_UNCI,immunohistochemistry",
                   help="multimodal: names from medmoe_mcore.demo.medical_images, one per sample")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.runtime import parallel

    own_groups = not parallel.started()  # an in-process caller keeps its own
    tp = args.tensor_model_parallel_size
    par = ParallelConfig(tensor_model_parallel_size=tp,
                         sequence_parallel=tp > 1 and not args.no_sequence_parallel,
                         expert_model_parallel_size=args.expert_model_parallel_size)
    parallel.initialize(par, seed=args.seed)
    cfg = store.read_config(args.load, par)
    cfg.params_dtype = args.dtype
    cfg.validate()
    if par.sequence_parallel and args.seq_length % tp:
        raise SystemExit(f"--seq-length {args.seq_length} must be divisible by TP={tp} with SP")
    device = parallel.device()
    dtype = getattr(torch, args.dtype)

    gen = torch.Generator().manual_seed(args.seed)
    if cfg.vision is not None:
        logits, ref, tokens = _multimodal(args, cfg, device, dtype, gen)
    else:
        model = LanguageModel(cfg, parallel_output=False).to(device)
        store.load_into(model, args.load)
        model.eval()
        tokens = torch.randint(0, cfg.language.vocab_size,
                               (args.micro_batch_size, args.seq_length), generator=gen).to(device)
        positions = torch.arange(args.seq_length, device=device).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            logits = model(tokens, positions, None)[..., : cfg.language.vocab_size].float()
            hf = _hf_reference(args.hf_dir, dtype).to(device).eval()
            ref = hf(input_ids=tokens).logits.float()
    diff = (logits - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    diff = diff.item()
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = 1e-4 if args.dtype == "float32" else 5e-2 * max(1.0, ref.abs().max().item())
    result = {"max_abs_logit_diff": diff, "tp": tp, "ep": par.expert_model_parallel_size,
              "moe": cfg.moe is not None, "multimodal": cfg.vision is not None,
              "sp": par.sequence_parallel, "dtype": args.dtype, "family": cfg.language.family,
              "device": device.type, "tokens": list(tokens.shape), "tolerance": tolerance,
              "passed": diff <= tolerance}
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    parallel.finish(tear_down=own_groups)
    return 0 if result["passed"] else 1


def _hf_reference(hf_dir, dtype):
    """The HF model of `hf_dir` with code from installed packages only: our exports' model
    types (whose folders carry a copy of medmoe_mcore/hf for `trust_remote_code` users) load
    with the installed medmoe_mcore classes; anything else with transformers' own. Code in the
    folder is never run."""
    from transformers import AutoModelForCausalLM

    from medmoe_mcore import hf as hf_classes
    from medmoe_mcore.conversion.hf_files import raw_config

    model_type = raw_config(hf_dir).get("model_type")
    if model_type in hf_classes.CLASSES:
        return hf_classes.model_class(model_type).from_pretrained(hf_dir, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, trust_remote_code=False)


def _multimodal(args, cfg, device, dtype, gen):
    """Megatron vs HF LLaVA logits over the spliced sequence (real images, random text)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.data.images import preprocess
    from medmoe_mcore.demo.medical_images import BY_NAME
    from medmoe_mcore.models.medmoe import MedMoEModel

    v = cfg.vision
    names = args.images.split(",")
    images = torch.stack([preprocess(BY_NAME[n].load(), v, train=False) for n in names])
    text = torch.randint(0, cfg.language.vocab_size, (len(names), args.seq_length),
                         generator=gen)
    text[text == v.image_token_id] = 0
    text[:, 1] = v.image_token_id  # after one text token, as the templates put it
    model = MedMoEModel(cfg, parallel_output=False).to(device)
    store.load_into(model, args.load)
    model.eval()
    expanded = torch.stack([torch.cat([row[:1], row.new_full((v.num_patches,), v.image_token_id),
                                       row[2:]]) for row in text])
    with torch.no_grad():
        logits = model(text.to(device), images.to(device, dtype))
        logits = logits[:, : expanded.shape[1], : cfg.language.vocab_size].float()
        hf = LlavaForConditionalGeneration.from_pretrained(args.hf_dir, dtype=dtype)
        hf = hf.to(device).eval()
        ref = hf(input_ids=expanded.to(device), pixel_values=images.to(device, dtype)).logits
    return logits, ref.float(), expanded


if __name__ == "__main__":
    sys.exit(main())
