"""The memory model (study/memory.py) against what a real step keeps: the activations saved for
backward (autograd's saved-tensor hooks, each storage once) at shapes the model was not fitted
on, Phi- and StableLM-shaped, dense and Med-MoE at top-1 and top-2; and the weights, DDP's
gradient buffer and Adam's state of a real stage-3 setup after one step."""

import dataclasses

import pytest
import torch

from medmoe_mcore.config.flavors import PHI_BLOCK, STABLELM_BLOCK
from medmoe_mcore.config.lora import LoRAConfig
from medmoe_mcore.config.model import LanguageConfig, ModelConfig, MoEConfig
from medmoe_mcore.study.memory import Step, activation_elements_per_token, plan


def _config(block, hidden, ffn, heads, groups, layers, experts, topk, lora=0) -> ModelConfig:
    lm = LanguageConfig(**block, vocab_size=1000, hidden_size=hidden, num_layers=layers,
                        num_attention_heads=heads, num_query_groups=groups,
                        ffn_hidden_size=ffn, max_position_embeddings=256, rotary_percent=0.5)
    moe = MoEConfig(num_experts=experts, router_topk=topk) if experts else None
    adapters = LoRAConfig(rank=lora).resolve_targets(moe) if lora else None
    return ModelConfig(language=lm, moe=moe, lora=adapters).validate()


def _saved_elements_per_token(model, tokens) -> float:
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, None, labels=tokens)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in weights) / 4 / tokens.numel()


@pytest.mark.parametrize("block,shape", [
    (PHI_BLOCK, (160, 640, 5, 5, 3, 0, 1)),
    (PHI_BLOCK, (96, 384, 3, 1, 4, 4, 2)),
    (STABLELM_BLOCK, (160, 448, 5, 5, 4, 8, 1)),
    (STABLELM_BLOCK, (256, 640, 8, 2, 2, 2, 2)),
    (PHI_BLOCK, (160, 640, 5, 5, 4, 4, 2, 16)),  # LoRA adapters on every linear
    (STABLELM_BLOCK, (192, 512, 6, 3, 3, 0, 1, 24)),
])
def test_activations_kept_for_backward_match_the_model(single_rank, block, shape):
    from medmoe_mcore.models.language import LanguageModel
    from medmoe_mcore.training.freezing import apply_stage

    cfg = _config(block, *shape)
    model = LanguageModel(cfg)
    apply_stage(model, 2, lora=cfg.lora is not None)
    tokens = torch.randint(0, 1000, (2, 160), generator=torch.Generator().manual_seed(0))
    measured = _saved_elements_per_token(model, tokens)
    e = activation_elements_per_token(cfg)
    predicted = e["sharded"] + e["norm"] + e["logits"]
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)
    step = plan(cfg, Step(stage=2, micro_batch_size=2, seq_length=160))
    assert step["activations"] == pytest.approx(predicted * 320 * 4)


def test_weights_gradients_and_optimizer_state_match_a_real_setup(single_rank):
    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.setup import stage_model, wrap

    cfg = _config(PHI_BLOCK, 64, 256, 4, 4, 4, 4, 2)
    train = TrainConfig(stage=3, train_iters=1, lr=1e-3)
    model, trainable = stage_model(cfg, train)
    setup = wrap(model, trainable, cfg, train)
    tokens = torch.randint(0, 1000, (2, 32))
    positions = torch.arange(32).unsqueeze(0).expand(2, -1)
    setup.ddp(tokens, positions, None, labels=tokens).float().mean().backward()
    setup.optimizer.step()
    measured = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(b.grad_data.numel() * b.grad_data.element_size()
                         for b in setup.ddp.buffers + setup.ddp.expert_parallel_buffers),
        "optimizer": sum(t.numel() * t.element_size() for opt in setup.optimizer.chained_optimizers
                         for s in opt.optimizer.state.values() for t in s.values()
                         if torch.is_tensor(t) and t.dim() > 0),
    }
    predicted = plan(cfg, Step(stage=3, micro_batch_size=2, seq_length=32))
    for part, value in measured.items():
        assert abs(predicted[part] / value - 1) < 0.05, (part, predicted[part], value)
    bf16 = plan(dataclasses.replace(cfg, params_dtype="bfloat16"),
                Step(stage=3, micro_batch_size=2, seq_length=32))
    assert bf16["optimizer"] == pytest.approx(predicted["optimizer"] * 12 / 8)
    sharded = plan(cfg, Step(stage=3, micro_batch_size=2, seq_length=32, data_parallel_size=4,
                             distributed_optimizer=True))
    assert sharded["optimizer"] == pytest.approx(predicted["optimizer"] / 4)


def test_the_planning_tool_marks_the_best_layout_that_fits(single_rank, capsys):
    from tools import plan_memory

    assert plan_memory.main(["--flavor", "tiny", "--search", "8", "--budget-gib", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    best = [line for line in lines if line.endswith("<- best")]
    assert len(best) == 1 and '"recompute": null' in best[0] and '"tp": 1' in best[0]
    assert sum('"tp": ' in line for line in lines) == 18  # TP 1-4 (4 heads) x EP 1-4 x 2
