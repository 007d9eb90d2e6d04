"""Router files, the authors' released routers, and upcycling (dense FFN -> experts)."""

from pathlib import Path

import pytest
import torch

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import language_flavor
from medmoe_mcore.config.model import ModelConfig, MoEConfig
from medmoe_mcore.router import file as router_file
from medmoe_mcore.router.file import RouterWeights

AUTHORS = Path(__file__).resolve().parents[1] / "data" / "authors-routers"
MODALITIES = ["CT", "MRI", "X-Ray", "pathology"]


def _router(hidden, experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return RouterWeights(torch.randn(experts, hidden, generator=gen),
                         torch.randn(experts, generator=gen),
                         [f"m{i}" for i in range(experts)])


def test_router_file_round_trip_and_refusals(tmp_path):
    r = _router(64, 4)
    path = router_file.save(r, tmp_path / "r.safetensors")
    back = router_file.load(path, hidden_size=64, num_experts=4)
    assert torch.equal(back.weight, r.weight) and torch.equal(back.bias, r.bias)
    assert back.modalities == r.modalities
    with pytest.raises(ConfigError, match=r"router hidden size 64 does not match the model's "
                                          r"hidden_size=2560"):
        router_file.load(path, hidden_size=2560)
    with pytest.raises(ConfigError, match=r"router has 4 experts \(rows\) but num_experts=6"):
        router_file.load(path, num_experts=6)
    from safetensors.torch import save_file

    save_file({"weight": r.weight, "bias": r.bias, "extra": r.bias.clone()}, str(tmp_path / "x.st"),
              metadata={"modalities": "[]"})
    with pytest.raises(ConfigError, match=r"unknown \['extra'\]"):
        router_file.load(tmp_path / "x.st")
    with pytest.raises(ConfigError, match="modalities"):
        router_file.save(RouterWeights(r.weight, r.bias, ["a", "a", "b", "c"]), tmp_path / "d")


@pytest.mark.parametrize("pth,flavor", [("phi_router.pth", "phi2"),
                                        ("stablelm_router.pth", "stablelm2_1_6b")])
def test_authors_routers_import_with_flavor_shapes(tmp_path, pth, flavor):
    lm = language_flavor(flavor)
    r = router_file.from_authors_pth(AUTHORS / pth, MODALITIES)
    out = router_file.save(r, tmp_path / "router.safetensors")
    back = router_file.load(out, hidden_size=lm.hidden_size, num_experts=4)
    assert back.modalities == MODALITIES
    assert back.weight.dtype == torch.float32 and back.weight.abs().sum() > 0
    with pytest.raises(ConfigError, match="modalities"):
        router_file.from_authors_pth(AUTHORS / pth, MODALITIES[:3])


def _dense_checkpoint(root, flavor):
    from medmoe_mcore.models.language import LanguageModel

    cfg = ModelConfig(language=language_flavor(flavor)).validate()
    model = LanguageModel(cfg)
    with torch.no_grad():  # non-zero biases so that bias scaling is checked too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    store.save(model.sharded_state_dict(), root, cfg)
    return model


@pytest.mark.parametrize("flavor,topk", [("tiny", 2), ("tiny_stablelm", 1)])
def test_upcycled_moe_layer_is_scaled_dense_ffn(tmp_path, single_rank, flavor, topk):
    """Right after upcycling: MoE layer output == (1 + sum of chosen G_i) * FFN(x); top-2
    renormalises by default (the authors' rule), so there the sum is 1."""
    from medmoe_mcore.conversion.upcycle import upcycle
    from medmoe_mcore.models.language import LanguageModel

    dense = _dense_checkpoint(tmp_path / "dense", flavor)
    lm = dense.model_config.language
    router = _router(lm.hidden_size, 4, seed=1)
    router_file.save(router, tmp_path / "router.safetensors")
    upcycle(tmp_path / "dense", tmp_path / "moe", MoEConfig(num_experts=4, router_topk=topk),
            tmp_path / "router.safetensors")
    cfg = store.read_config(tmp_path / "moe").validate()
    assert cfg.moe.modalities == router.modalities
    assert cfg.moe.renormalize is (topk == 2)
    moe = LanguageModel(cfg)
    store.load_into(moe, tmp_path / "moe")
    x = torch.randn(8, 2, lm.hidden_size)
    with torch.no_grad():
        for i, is_moe in enumerate(cfg.moe.moe_layers(lm.num_layers)):
            out, bias = dense.decoder.layers[i].mlp(x)
            ffn = out + bias if bias is not None else out
            got, _ = moe.decoder.layers[i].mlp(x)
            if not is_moe:
                assert torch.allclose(got, out, atol=1e-6)
                continue
            g = torch.softmax(x.reshape(-1, lm.hidden_size) @ router.weight.T + router.bias, -1)
            chosen = g.topk(topk, dim=-1).values.sum(-1).reshape(8, 2, 1)
            if cfg.moe.renormalize:
                chosen = torch.ones_like(chosen)
            assert torch.allclose(got, (1 + chosen) * ffn, atol=1e-5)


def test_upcycle_refuses_a_router_of_the_wrong_shape(tmp_path, single_rank):
    from medmoe_mcore.conversion.upcycle import upcycle

    _dense_checkpoint(tmp_path / "dense", "tiny")
    router_file.save(_router(32, 4), tmp_path / "r.safetensors")
    with pytest.raises(ConfigError, match="does not match the model's hidden_size=64"):
        upcycle(tmp_path / "dense", tmp_path / "moe", MoEConfig(), tmp_path / "r.safetensors")
    router_file.save(_router(64, 2), tmp_path / "r2.safetensors")
    with pytest.raises(ConfigError, match="router has 2 experts"):
        upcycle(tmp_path / "dense", tmp_path / "moe", MoEConfig(), tmp_path / "r2.safetensors")
    assert not (tmp_path / "moe").exists()


def test_stage3_updates_experts_only(tmp_path, single_rank):
    """Over optimizer steps: router, attention, embeddings, norms and LM head stay bitwise
    unchanged; experts, meta expert and the non-MoE dense FFNs change."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.training.freezing import apply_stage

    cfg = ModelConfig(language=language_flavor("tiny"),
                      moe=MoEConfig(num_experts=4, router_topk=2)).validate()
    model = LanguageModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_()
    trainable = apply_stage(model, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), [ddp])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 16), generator=gen)
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    for _ in range(3):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(tokens, positions, None, labels=tokens).float().mean().backward()
        finalize_model_grads([ddp])
        assert opt.step()[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
    assert any(".mlp.router." in n for n in before) and not any("router" in n for n in changed)
    for kind in (".mlp.experts.local_experts.3.", ".mlp.shared_experts.", "layers.1.mlp.linear_fc1"):
        assert any(kind in n for n in changed), kind
    for kind in ("self_attention", "layernorm", "embedding", "output_layer"):
        assert not any(kind in n for n in changed), kind


@pytest.mark.parametrize("flavor,main_grad", [("tiny", False), ("tiny", True),
                                               ("tiny_stablelm", True)])
def test_lean_experts_equal_megatrons_sequential_mlp(single_rank, flavor, main_grad):
    """The experts' compute with the routing weight after fc2 (moe/experts.py) gives
    Megatron's SequentialMLP output and every gradient within 1e-6 (float32), including
    experts that receive no token; under DDP (`main_grad`, the case in training) the weight
    gradients are added to what the buffer held."""
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from medmoe_mcore.models.moe.experts import LeanSequentialMLP
    from medmoe_mcore.models.specs.backends import LOCAL
    from medmoe_mcore.models.transformer_config import language_transformer_config

    cfg = ModelConfig(language=language_flavor(flavor), moe=MoEConfig(num_experts=4)).validate()
    config = language_transformer_config(cfg)
    sub = MLPSubmodules(linear_fc1=LOCAL.expert_column_linear,
                        linear_fc2=LOCAL.expert_row_linear)
    ours, theirs = (build_module(ModuleSpec(module=cls, submodules=sub), 4, config,
                                 pg_collection=get_default_pg_collection())
                    for cls in (LeanSequentialMLP, SequentialMLP))
    torch.manual_seed(0)
    with torch.no_grad():
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            a.normal_(0, 0.05)
            b.copy_(a)
    counts = torch.tensor([5, 0, 7, 3])
    x = torch.randn(int(counts.sum()), cfg.language.hidden_size)
    probs = torch.rand(len(x))
    held = 0.25  # what Megatron's buffer held before this micro-batch
    if main_grad:
        for p in ours.parameters():
            p.main_grad, p.grad_added_to_main_grad = torch.full_like(p, held), False
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out, bias = module(xi, counts, probs)
        assert bias is None
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads = [p.main_grad - held if getattr(p, "grad_added_to_main_grad", False) else p.grad
                 for p in module.parameters()]
        results.append((out, xi.grad, grads))
    if main_grad:  # weights went to the buffer, biases the usual way (DDP adds them)
        assert all(p.grad_added_to_main_grad == (p.dim() == 2) for p in ours.parameters())
    (o1, g1, p1), (o2, g2, p2) = results
    # relative to each tensor's largest entry: float32 rounding of the reordered products
    diffs = [((a - b).abs().max() / b.abs().max()).item()
             for a, b in zip([o1, g1, *p1], [o2, g2, *p2])]
    assert max(diffs) < 1e-6, diffs
    assert o1.abs().max() > 0.1  # a scale at which 1e-6 means something


def test_expert_linear_accumulates_weight_gradients_like_megatron():
    """expert_linear (moe/expert_linear.py): without DDP, autograd's gradients; with a
    same-dtype `main_grad`, the weight gradient added in place and DDP's hook told so
    (placeholder gradient, zeros when `zero_out_wgrad`); with a float32 buffer under bf16
    weights, exactly Megatron's unfused rounding (bf16 product added)."""
    import torch.nn.functional as F

    from medmoe_mcore.models.moe.expert_linear import expert_linear

    gen = torch.Generator().manual_seed(0)
    x, w, b, g = (torch.randn(*shape, generator=gen) for shape in ((5, 3), (4, 3), (4,), (5, 4)))

    def grads(fn, dtype=torch.float32, **attrs):
        xi, wi, bi = (t.to(dtype).clone().requires_grad_() for t in (x, w, b))
        for name, value in attrs.items():
            setattr(wi, name, value)
        out = fn(xi, wi, bi)
        out.backward(g.to(dtype))
        return out, xi.grad, wi, bi.grad

    ref_out, ref_x, ref_w, ref_b = grads(F.linear)
    out, gx, wi, gb = grads(expert_linear)
    for a, r in ((out, ref_out), (gx, ref_x), (wi.grad, ref_w.grad), (gb, ref_b)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
    _, _, wi, _ = grads(expert_linear, main_grad=torch.ones(4, 3), grad_added_to_main_grad=False)
    torch.testing.assert_close(wi.main_grad, 1 + ref_w.grad, rtol=0, atol=1e-6)
    assert wi.grad_added_to_main_grad and wi.grad.shape == (4, 3)
    _, _, wi, _ = grads(expert_linear, main_grad=torch.zeros(4, 3), zero_out_wgrad=True)
    assert torch.count_nonzero(wi.grad) == 0
    _, _, wi, _ = grads(expert_linear, torch.bfloat16, main_grad=torch.zeros(4, 3))
    unfused = (g.bfloat16().t() @ x.bfloat16()).float()
    assert wi.main_grad.dtype == torch.float32 and torch.equal(wi.main_grad, unfused)


def test_short_expert_blocks_are_padded_to_the_kernel_width():
    """pad_short_block (moe/expert_linear.py): a short block gets zero rows up to a multiple
    of WEIGHT_LEFT_ROW_MULTIPLE; a block already a multiple, or long enough to go tokens-left,
    is returned as it is. (That the padded rows change no output or gradient is the lean
    experts' parity test above: its blocks of 5, 7 and 3 rows are all padded.)"""
    from medmoe_mcore.models.moe.expert_linear import (WEIGHT_LEFT_BELOW_ROWS,
                                                       WEIGHT_LEFT_ROW_MULTIPLE, pad_short_block)

    m = WEIGHT_LEFT_ROW_MULTIPLE
    x = torch.randn(m + 3, 2)
    padded = pad_short_block(x)
    assert padded.shape == (2 * m, 2) and torch.equal(padded[:m + 3], x)
    assert torch.count_nonzero(padded[m + 3:]) == 0
    for rows in (0, m, WEIGHT_LEFT_BELOW_ROWS + 1):
        block = torch.randn(rows, 2)
        assert pad_short_block(block) is block


def test_an_expert_without_tokens_leaves_its_gradient_buffer_unwritten():
    """An idle expert (zero rows) still reaches DDP's hook (grad_added_to_main_grad) but never
    writes `main_grad`: `addmm_` with an empty inner dimension would rewrite the whole buffer."""
    from medmoe_mcore.models.moe.expert_linear import expert_linear

    w = torch.randn(4, 3).requires_grad_()
    w.main_grad = torch.ones(4, 3)
    version = w.main_grad._version
    expert_linear(torch.zeros(0, 3, requires_grad=True), w, None).sum().backward()
    assert w.grad_added_to_main_grad and w.main_grad._version == version
    assert torch.equal(w.main_grad, torch.ones(4, 3))
    expert_linear(torch.ones(2, 3, requires_grad=True), w, None).sum().backward()
    assert w.main_grad._version > version  # a block with tokens does write it
