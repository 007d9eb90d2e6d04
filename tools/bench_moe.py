"""Forward+backward time of one Med-MoE layer (modality router, top-k of E experts + meta
expert; Megatron-Core MoELayer with the alltoall dispatcher) against

  dense:     (k + 1) dense FFNs of the same shape on all tokens: the compute it must do;
  reference: a DeepSpeed-style layer as in the authors' code: no token dropping, so every
             expert is padded to the largest per-expert load, one-hot dispatch/combine
             einsums, plus the meta expert.

Two routing regimes: balanced (random router) and modality-skewed (a batch of one modality:
nearly every token picks the same top-k). Prints a JSON line per regime.

    python tools/bench_moe.py --hidden 1024 --ffn 4096 --tokens 4096
"""

import argparse
import json
import statistics
import time


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.config import LanguageConfig, ModelConfig, MoEConfig, ParallelConfig
    from medmoe_mcore.flavors import PHI_BLOCK
    from medmoe_mcore.models.transformer_config import language_transformer_config
    from medmoe_mcore.models.specs.backends import LOCAL
    from megatron.core.transformer.spec_utils import build_module
    from medmoe_mcore.models.moe.spec import moe_mlp_spec

    E, k, H, Fh, T = args.num_experts, args.moe_router_topk, args.hidden, args.ffn, args.tokens
    lm = LanguageConfig(**PHI_BLOCK, vocab_size=128, hidden_size=H, num_layers=1,
                        num_attention_heads=8, num_query_groups=8, ffn_hidden_size=Fh,
                        max_position_embeddings=T, rotary_percent=0.5)
    moe = MoEConfig(num_experts=E, router_topk=k, layer_freq=1)
    cfg = ModelConfig(language=lm, moe=moe).validate()
    parallel.initialize(ParallelConfig())
    config = language_transformer_config(cfg)
    layer = build_module(moe_mlp_spec(moe, LOCAL), config=config, layer_number=1)
    torch.manual_seed(0)

    def ffn_params():
        return [torch.randn(Fh, H) * 0.02, torch.zeros(Fh), torch.randn(H, Fh) * 0.02,
                torch.zeros(H)]

    def ffn(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    ref_experts = [[t.requires_grad_() for t in ffn_params()] for _ in range(E)]
    ref_meta = [t.requires_grad_() for t in ffn_params()]
    dense = [[t.requires_grad_() for t in ffn_params()] for _ in range(k + 1)]
    x0 = torch.randn(T, 1, H)

    def set_router(regime):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            router = layer.router
            if regime == "balanced":
                router.weight.copy_(torch.randn(E, H, generator=gen))
                router.bias.zero_()
            else:  # one modality: the same top-k for (nearly) every token
                router.weight.copy_(torch.randn(E, H, generator=gen) * 1e-3)
                router.bias.copy_(torch.tensor([8.0 - i for i in range(E)]))

    def run_medmoe():
        x = x0.clone().requires_grad_()
        out, _ = layer(x)
        out.sum().backward()

    def run_dense():
        x = x0.reshape(T, H).clone().requires_grad_()
        sum(ffn(x, *w) for w in dense).sum().backward()

    def run_reference():
        x = x0.reshape(T, H).clone().requires_grad_()
        gates = torch.softmax(F.linear(x.float(), layer.router.weight, layer.router.bias), -1)
        top, index = gates.topk(k, dim=-1)
        mask = torch.zeros_like(gates).scatter(1, index, 1.0)  # [T, E]
        capacity = int(mask.sum(0).max())  # no dropping: pad to the largest load
        slot = (torch.cumsum(mask, 0) - 1) * mask  # position of each token in its expert
        dispatch = F.one_hot(slot.long(), capacity).float() * mask.unsqueeze(-1)  # [T, E, C]
        combine = dispatch * torch.zeros_like(gates).scatter(1, index, top).unsqueeze(-1)
        expert_in = torch.einsum("tec,tm->ecm", dispatch, x)
        expert_out = torch.stack([ffn(expert_in[e], *ref_experts[e]) for e in range(E)])
        out = torch.einsum("tec,ecm->tm", combine, expert_out) + ffn(x, *ref_meta)
        out.sum().backward()
        return capacity

    dense_s = timed(run_dense, args.repeats)
    for regime in ("balanced", "skewed"):
        set_router(regime)
        with torch.no_grad():
            probs, routing_map = layer.router(x0)
        load = routing_map.sum(0).tolist()
        medmoe_s = timed(run_medmoe, args.repeats)
        ref_s = timed(run_reference, args.repeats)
        print(json.dumps({
            "regime": regime, "tokens": T, "hidden": H, "ffn": Fh, "experts": E, "topk": k,
            "tokens_per_expert": load, "threads": torch.get_num_threads(),
            "medmoe_s": round(medmoe_s, 4), "dense_k_plus_1_ffn_s": round(dense_s, 4),
            "deepspeed_style_s": round(ref_s, 4),
            "medmoe_vs_dense": round(medmoe_s / dense_s, 3),
            "reference_vs_dense": round(ref_s / dense_s, 3),
            "speedup_vs_reference": round(ref_s / medmoe_s, 3)}), flush=True)


if __name__ == "__main__":
    main()
