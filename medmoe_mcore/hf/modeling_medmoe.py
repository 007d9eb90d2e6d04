"""Med-MoE causal LMs for `transformers`, in the authors' parameter layout:

    model.layers.{i}.mlp.deepspeed_moe.gate.wg.{weight,bias}          modality router
    model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.*  expert j
    model.layers.{i}.mlp.meta_moe.*                                   meta expert

O = sum_{i in top-k} G_i * E_i(x) + E_meta(x), G = softmax over all experts (float32), not
renormalised unless `moe.renormalize`. No capacity limit, no token dropping.
"""

import torch
from torch import nn
from transformers import PhiForCausalLM, StableLmForCausalLM
from transformers.models.phi.modeling_phi import PhiMLP
from transformers.models.stablelm.modeling_stablelm import StableLmMLP

from .configuration_medmoe import MedMoePhiConfig, MedMoeStableLmConfig


class _Gate(nn.Module):
    def __init__(self, hidden_size, num_experts, bias):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=bias, dtype=torch.float32)


class _Experts(nn.Module):
    def __init__(self, config, mlp_class, num_experts):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(mlp_class(config) for _ in range(num_experts))


class _DeepSpeedMoE(nn.Module):
    def __init__(self, config, mlp_class, num_experts, gate_bias):
        super().__init__()
        self.gate = _Gate(config.hidden_size, num_experts, gate_bias)
        self.experts = _Experts(config, mlp_class, num_experts)


class MedMoeBlock(nn.Module):
    def __init__(self, config, mlp_class, num_experts):
        super().__init__()
        moe = config.moe
        self.topk = moe["top_k_experts"]
        self.renormalize = moe.get("renormalize", False)
        self.sample_routing = moe.get("routing_granularity", "token") == "sample"
        # The modality router has a bias; Megatron's learned router has one when the
        # backbone's linear layers do (Phi-2).
        self.deepspeed_moe = _DeepSpeedMoE(config, mlp_class, num_experts,
                                           moe.get("router_bias", True))
        self.meta_moe = mlp_class(config) if moe.get("meta_expert", True) else None

    def routing(self, x):
        """[B, S, H] -> combine weights [B, S, E] ([B, 1, E] with sample routing), zero
        outside the top-k."""
        wg = self.deepspeed_moe.gate.wg
        x = x.float()
        if self.sample_routing:
            x = x.mean(dim=1, keepdim=True)
        scores = torch.softmax(nn.functional.linear(x, wg.weight.float(),
                                                    None if wg.bias is None else wg.bias.float()),
                               dim=-1)
        top, index = scores.topk(self.topk, dim=-1)
        if self.renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return torch.zeros_like(scores).scatter(-1, index, top)

    def forward(self, hidden_states):
        weights = self.routing(hidden_states).expand(*hidden_states.shape[:2], -1)
        out = torch.zeros_like(hidden_states)
        for j, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            chosen = weights[..., j] > 0
            if chosen.any():
                w = weights[..., j][chosen].unsqueeze(-1)
                out[chosen] += (w * expert(hidden_states[chosen]).float()).to(out.dtype)
        if self.meta_moe is not None:
            out = out + self.meta_moe(hidden_states)
        return out


def _install_moe(model, config, mlp_class):
    moe = config.moe
    experts = moe["num_experts"]
    for pos, layer in enumerate(moe["moe_layers_idx"]):
        n = experts[pos] if isinstance(experts, (list, tuple)) else experts
        model.model.layers[layer].mlp = MedMoeBlock(config, mlp_class, n)


class MedMoePhiForCausalLM(PhiForCausalLM):
    config_class = MedMoePhiConfig

    def __init__(self, config):
        super().__init__(config)
        if not config.lm_head_bias:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _install_moe(self, config, PhiMLP)
        self.post_init()


class MedMoeStableLmForCausalLM(StableLmForCausalLM):
    config_class = MedMoeStableLmConfig

    def __init__(self, config):
        super().__init__(config)
        _install_moe(self, config, StableLmMLP)
        self.post_init()
