"""LoRA adapters on Megatron's parallel linears (issue 16, first piece): at TP = 1, a zero B
leaves the output exactly the base's, a trained adapter equals the merged weight, and only
A and B learn."""

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from medmoe_mcore.config.flavors import language_flavor
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.models.lora.adapter import LoRAAdapter


def _linear(cls, config, n_in, n_out):
    extra = dict(gather_output=False) if cls is ColumnParallelLinear else \
        dict(input_is_parallel=True)
    return cls(n_in, n_out, config=config, init_method=config.init_method, bias=True,
               skip_bias_add=False, **extra)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_adapter_starts_as_the_base_and_merges_exactly(single_rank, cls):
    from medmoe_mcore.models.transformer_config import language_transformer_config

    config = language_transformer_config(ModelConfig(language=language_flavor("tiny")).validate())
    base = _linear(cls, config, 64, 96)
    for p in base.parameters():
        p.requires_grad_(False)
    adapter = LoRAAdapter(base, rank=8, alpha=16, seed=3)
    assert adapter.a.shape == (8, 64) and adapter.b.shape == (96, 8)
    x = torch.randn(5, 2, 64)
    plain, _ = base(x)
    assert torch.equal(plain + adapter(x), plain)  # B = 0: exactly the base model
    with torch.no_grad():
        adapter.b.normal_(0, 0.1)
    out = base(x)[0] + adapter(x)
    merged = torch.nn.functional.linear(x, base.weight + adapter.delta_weight(), base.bias)
    assert (out - merged).abs().max() < 1e-5
    out.square().sum().backward()
    assert adapter.a.grad.abs().sum() > 0 and adapter.b.grad.abs().sum() > 0
    assert base.weight.grad is None
    again = LoRAAdapter(base, rank=8, alpha=16, seed=3)
    assert torch.equal(again.a, adapter.a)  # seeded: the same A on every rank and layout


def test_adapter_refuses_what_it_cannot_wrap(single_rank):
    with pytest.raises(TypeError, match="needs a Megatron Column/RowParallelLinear, got Linear"):
        LoRAAdapter(torch.nn.Linear(4, 4), rank=2, alpha=4)


# --- the adapters in the Med-MoE model (issue 16) ---------------------------------------------

def _medmoe_cfg(tmp_path, flavor="tiny", lora=None):
    """A tiny Med-MoE config (top-2 + meta expert) with the tokenizer of a small HF BPE."""
    from medmoe_mcore.config.flavors import medmoe_language, vision_flavor
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.config.model import MoEConfig
    from medmoe_mcore.data.tokenizer import train_bpe

    tok_dir = tmp_path / "tok"
    tok = train_bpe(["a chest x-ray", "an axial slice"] * 20, tok_dir, vocab_size=300)
    moe = MoEConfig(router_topk=2)
    return ModelConfig(language=medmoe_language(flavor), moe=moe,
                       vision=vision_flavor(flavor, tok.image_token_id),
                       lora=None if lora is None else LoRAConfig(**lora).resolve_targets(moe)
                       ).validate(), tok_dir


def _batch(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    v = cfg.vision
    images = torch.randn(1, 3, v.image_size, v.image_size, generator=gen)
    ids = torch.tensor([[5, v.image_token_id, 9, 13, 7]])
    return ids, images


def test_zero_b_leaves_the_model_exactly_the_base(tmp_path, single_rank):
    import dataclasses

    from medmoe_mcore.models.medmoe import MedMoEModel

    cfg, _ = _medmoe_cfg(tmp_path, lora=dict(rank=4))  # default dropout 0.05: B = 0 anyway
    base = MedMoEModel(dataclasses.replace(cfg, lora=None))
    adapted = MedMoEModel(cfg)
    missing, unexpected = adapted.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".lora." in k for k in missing)
    ids, images = _batch(cfg)
    for mode in ("train", "eval"):
        getattr(base, mode)(), getattr(adapted, mode)()
        torch.manual_seed(0)
        expected = base(ids, images)
        torch.manual_seed(0)
        assert torch.equal(adapted(ids, images), expected), mode


def test_lora_trainable_sets():
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.training.freezing import trainable_patterns

    names = ["projector.encoder.linear_fc1.weight", "vision.decoder.layers.0.mlp.fc1.weight",
             "language_model.decoder.layers.0.mlp.router.weight",
             "language_model.decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.lora.b",
             "language_model.decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight",
             "language_model.decoder.layers.1.self_attention.linear_qkv.lora.a",
             "language_model.embedding.word_embeddings.weight"]

    def trained(stage, **kw):
        import re
        train, never = trainable_patterns(stage, lora=True, **kw)
        return [n for n in names if any(re.search(p, n) for p in train)
                and not any(re.search(p, n) for p in never)]

    adapters = [n for n in names if ".lora." in n]
    assert trained(3) == [names[0], *adapters]  # paper: LoRA + projector; router, CLIP frozen
    assert trained(3, train_projector=False) == adapters
    assert trained(2) == [names[0], *adapters]
    with pytest.raises(ConfigError, match="stage 1 trains the projector only"):
        trainable_patterns(1, lora=True)


def test_lora_config_is_checked_and_travels_with_the_model():
    import dataclasses

    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.config.lora import LoRAConfig
    from medmoe_mcore.config.model import MoEConfig
    from medmoe_mcore.training.arguments import lora_config, reconcile_lora

    moe = MoEConfig()
    lora = LoRAConfig(rank=128).resolve_targets(moe)
    assert lora.alpha == 256 and "meta_expert" in lora.target_modules  # LLaVA's recipe
    assert LoRAConfig(rank=8).resolve_targets(None).target_modules == \
        ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    for bad, match in ((dict(rank=0), "rank=0"), (dict(rank=4, dropout=1.0), "dropout=1.0"),
                       (dict(rank=4, target_modules=["q_proj"]), "target_modules")):
        with pytest.raises(ConfigError, match=match):
            LoRAConfig(**bad).resolve_targets(moe).validate(moe)
    with pytest.raises(ConfigError, match="has no experts"):
        LoRAConfig(rank=4, target_modules=["experts"]).validate(None)
    with pytest.raises(ConfigError, match="--lora-alpha without --lora-rank"):
        lora_config({"alpha": 4.0}, moe, seed=1)
    cfg = ModelConfig(language=language_flavor("tiny"), moe=moe, lora=lora).validate()
    assert ModelConfig.from_json(cfg.to_json()).lora == lora
    plain = dataclasses.replace(cfg, lora=None)
    with pytest.raises(ConfigError, match="trained without LoRA; a resumed run cannot add"):
        reconcile_lora(plain, "ckpt", {"rank": 4}, resuming=True, seed=1)
    assert reconcile_lora(plain, "ckpt", {"rank": 4}, resuming=False, seed=7)
    assert plain.lora.rank == 4 and plain.lora.init_seed == 7
    with pytest.raises(ConfigError, match="--lora-rank 8: the checkpoint has lora.rank=128"):
        reconcile_lora(cfg, "ckpt", {"rank": 8}, resuming=True, seed=1)


def test_base_weights_do_not_move_and_adapters_do(tmp_path, single_rank):
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from medmoe_mcore.models.medmoe import MedMoEModel
    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.freezing import apply_stage
    from medmoe_mcore.training.setup import wrap

    cfg, _ = _medmoe_cfg(tmp_path, lora=dict(rank=4))
    model = MedMoEModel(cfg)
    trainable = apply_stage(model, 3, lora=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    setup = wrap(model, trainable, cfg, TrainConfig(stage=3, lr=1e-2, train_iters=4,
                                                    lr_warmup_fraction=0.0))
    ids, images = _batch(cfg)
    for _ in range(2):
        setup.ddp.zero_grad_buffer()
        setup.optimizer.zero_grad()
        loss, mask = setup.ddp(ids, images, ids.clamp(min=0))
        (loss * mask).sum().backward()
        finalize_model_grads([setup.ddp])
        assert setup.optimizer.step()[0]
    after = model.state_dict()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert moved and all(".lora." in k or k.startswith("projector.") for k in moved)
    assert any(k.endswith(".lora.b") for k in moved) and any(k.endswith(".lora.a") for k in moved)


def _trained_lora_checkpoint(tmp_path, flavor):
    """A LoRA Med-MoE checkpoint whose adapters look trained (random A and B)."""
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.models.medmoe import MedMoEModel

    cfg, tok_dir = _medmoe_cfg(tmp_path, flavor, lora=dict(rank=4, alpha=6.0, dropout=0.0))
    torch.manual_seed(0)
    model = MedMoEModel(cfg, parallel_output=False)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name or "bias" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    store.save(model.sharded_state_dict(), tmp_path / "lora", cfg,
                       extra_dirs={store.TOKENIZER: tok_dir})
    return model.eval(), cfg


@pytest.mark.parametrize("flavor", ["tiny", "tiny_stablelm"])
def test_merge_and_peft_export_give_the_megatron_logits(tmp_path, single_rank, flavor):
    """Merged checkpoint and merged release vs the adapted model: 1e-5 / 1e-4; the PEFT
    adapter on the base release, loaded by peft, vs the adapted model: 1e-4 (fused q/k/v with
    query groups and gate/up split by the release's own table)."""
    from peft import PeftModel

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.conversion.lora_merge import merge_checkpoint
    from medmoe_mcore.conversion.release import export_release
    from medmoe_mcore.hf import model_class
    from medmoe_mcore.models.medmoe import MedMoEModel

    model, cfg = _trained_lora_checkpoint(tmp_path, flavor)
    ids, images = _batch(cfg)
    with torch.no_grad():
        ours = model(ids, images)[0, :, :cfg.language.vocab_size]
    merge_checkpoint(tmp_path / "lora", tmp_path / "merged")
    merged_cfg = store.read_config(tmp_path / "merged")
    assert merged_cfg.lora is None
    merged = MedMoEModel(merged_cfg, parallel_output=False).eval()
    store.load_into(merged, tmp_path / "merged")
    with torch.no_grad():
        assert (merged(ids, images)[0, :, :cfg.language.vocab_size] - ours).abs().max() < 1e-5

    with pytest.raises(ConfigError, match="choose --lora-merge .* or --peft-adapter-dir"):
        export_release(tmp_path / "lora", tmp_path / "nothing", show_progress=False)
    export_release(tmp_path / "lora", tmp_path / "base", show_progress=False,
                   peft_adapter_dir=tmp_path / "adapter")
    assert "base model of a LoRA training" in (tmp_path / "base" / "README.md").read_text()
    export_release(tmp_path / "lora", tmp_path / "merged_release", show_progress=False,
                   lora_merge=True)
    hf_type = "moe_llava_phi" if flavor == "tiny" else "moe_llava_stablelm"
    cls = model_class(hf_type)
    base = cls.from_pretrained(tmp_path / "base").eval()
    hf_ids = torch.tensor([[5, *[base.config.image_token_index] * cfg.vision.num_patches,
                            9, 13, 7]])
    with torch.no_grad():
        plain = base(input_ids=hf_ids, pixel_values=images).logits[0]
        assert (plain - ours).abs().max() > 1e-3  # the adapters matter: the check can fail
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        adapted = peft_model(input_ids=hf_ids, pixel_values=images).logits[0]
        assert (adapted - ours).abs().max() < 1e-4
        merged_hf = cls.from_pretrained(tmp_path / "merged_release").eval()
        assert (merged_hf(input_ids=hf_ids, pixel_values=images).logits[0] - ours
                ).abs().max() < 1e-4


def test_adapter_dropout_follows_megatrons_rng_conventions(single_rank):
    """A replicated input (column layer, no SP) draws its mask from the default generator, the
    same on every TP rank; a TP-split input (row layer) from the model-parallel tracker, so the
    default generator is left as it was."""
    from medmoe_mcore.models.transformer_config import language_transformer_config

    config = language_transformer_config(ModelConfig(language=language_flavor("tiny")).validate())
    x = torch.randn(5, 2, 64)
    for cls, moves_default in ((ColumnParallelLinear, True), (RowParallelLinear, False)):
        adapter = LoRAAdapter(_linear(cls, config, 64, 64), rank=4, alpha=8, dropout=0.5)
        before = torch.get_rng_state()
        adapter(x)
        assert (not torch.equal(before, torch.get_rng_state())) is moves_default, cls.__name__
        adapter.eval()
        before = torch.get_rng_state()
        adapter(x)
        assert torch.equal(before, torch.get_rng_state())  # no dropout at evaluation


def test_peft_adapter_imports_back_bit_exact_and_refuses_what_megatron_cannot_hold(
        tmp_path, single_rank):
    """LoRA checkpoint -> release + PEFT adapter -> LoRA checkpoint -> the same files again;
    q/k/v adapters with different A (trained apart) and rsLoRA are refused naming the fix."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.conversion.engine import ConversionError
    from medmoe_mcore.conversion.llava import import_multimodal
    from medmoe_mcore.conversion.release import export_release

    _, cfg = _trained_lora_checkpoint(tmp_path, "tiny_stablelm")
    export_release(tmp_path / "lora", tmp_path / "rel", show_progress=False,
                   peft_adapter_dir=tmp_path / "ad")
    import_multimodal(tmp_path / "rel", tmp_path / "back", show_progress=False,
                      peft_adapter_dir=tmp_path / "ad")
    back = store.read_config(tmp_path / "back")
    assert (back.lora.rank, back.lora.alpha, back.lora.dropout, back.lora.target_modules) == \
        (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    export_release(tmp_path / "back", tmp_path / "rel2", show_progress=False,
                   peft_adapter_dir=tmp_path / "ad2")
    for folder, name in (("ad", "adapter_model.safetensors"), ("rel", "model.safetensors")):
        a, b = (load_file(tmp_path / f / name) for f in (folder, folder + "2"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), folder
    assert (tmp_path / "ad" / "adapter_config.json").read_text() == \
        (tmp_path / "ad2" / "adapter_config.json").read_text()

    apart = tmp_path / "apart"
    shutil.copytree(tmp_path / "ad", apart)
    tensors = load_file(apart / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"
    tensors[key] = tensors[key] + 1
    save_file(tensors, apart / "adapter_model.safetensors")
    with pytest.raises(ConversionError, match="k_proj.*different lora_A.*merge_and_unload"):
        import_multimodal(tmp_path / "rel", tmp_path / "no", show_progress=False,
                          peft_adapter_dir=apart)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (apart / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(ConfigError, match="use_rslora=True: not a Megatron adapter"):
        import_multimodal(tmp_path / "rel", tmp_path / "no", show_progress=False,
                          peft_adapter_dir=apart)
    # a rank that disagrees with the adapter's tensors: named on the meta device, never built
    (apart / "adapter_config.json").write_text(json.dumps({**config, "r": 10**6}))
    with pytest.raises(ConversionError, match=r"check adapter_config.json r=1000000"):
        import_multimodal(tmp_path / "rel", tmp_path / "no", show_progress=False,
                          peft_adapter_dir=apart)
    assert not (tmp_path / "no").exists()
