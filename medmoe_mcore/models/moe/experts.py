"""The routed experts' compute, lean: Megatron's SequentialMLP parameters and layout, one
expert after another, with the routing weight applied after fc2.

Megatron's SequentialMLP runs each expert through a full MLP module and scales the
[tokens, FFN] activation by the routing weight (then adds the probability-scaled fc2 bias):

    G * (W2 act(W1 x + b1) + b2)   computed as   W2 (G * act(W1 x + b1)) + G * b2

Scaling the [tokens, hidden] output instead is the same sum (float32 rounding apart,
tests/unit/test_moe.py) and touches FFN/hidden times fewer elements, forward and backward. The
parameters are the expert linears' own (same names, shards, tags and checkpoints), read by
`expert_linear` (weight gradients accumulated in place, expert_linear.py): with local linears
an expert's matmul has no communication inside it (the token dispatcher does the expert-TP
reduction), so nothing is skipped. Transformer Engine's expert linears keep Megatron's module
(backends.py), whose kernels they need.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from medmoe_mcore.models.moe.expert_linear import expert_linear, pad_short_block
from medmoe_mcore.models.transformer_config import expert_activation


def _local_linear(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An expert linear without communication, its LoRA adapter's addition included."""
    output = expert_linear(x, linear.weight, linear.bias)
    adapter = getattr(linear, "lora", None)
    return output if adapter is None else output + adapter(x).to(output.dtype)


def run_pre_hooks(modules) -> None:
    """The forward pre-hooks of linears whose weights are read here without calling them: one
    is Megatron DDP's wait for the parameter all-gather of --overlap-param-gather, without
    which an expert would compute with last step's weights."""
    for module in modules:
        for hook in module._forward_pre_hooks.values():
            hook(module, ())


class LeanSequentialMLP(SequentialMLP):
    """SequentialMLP's experts, computed as `G * (W2 act(W1 x + b1) + b2)` per expert."""

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.bias_activation_fusion or not config.gated_linear_unit:
            return expert_activation(config)(x)
        gate, linear = torch.chunk(x, 2, dim=-1)
        return config.activation_func(gate) * linear

    def _lean_applies(self) -> bool:
        """Megatron's variants this compute does not reproduce run Megatron's own code."""
        c = self.config
        return not (c.moe_apply_probs_on_input or c.fp8 or c.fp4
                    or c.use_te_activation_func or c.activation_func_clamp_value is not None
                    or c.glu_linear_offset != 0)

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        if not self._lean_applies():
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs)
        run_pre_hooks(m for e in self.local_experts for m in (e.linear_fc1, e.linear_fc2))
        counts = tokens_per_expert.tolist()
        outputs = []
        for expert, tokens, probs in zip(self.local_experts,
                                         torch.split(permuted_local_hidden_states, counts),
                                         torch.split(permuted_probs, counts)):
            hidden = self._activation(_local_linear(expert.linear_fc1, pad_short_block(tokens)))
            output = _local_linear(expert.linear_fc2, hidden)[:len(tokens)]
            outputs.append((output * probs.unsqueeze(-1)).to(output.dtype))
        return torch.cat(outputs, dim=0), None


def _stacked(linears, name: str) -> torch.Tensor | None:
    tensors = [getattr(linear, name) for linear in linears]
    return None if tensors[0] is None else torch.stack([t.detach() for t in tensors])


class _GroupedLinear(torch.autograd.Function):
    """Every local expert's linear at once on the permuted tokens (`offs`: the groups' end
    rows, on the device: no host sync), biases added per group. The experts' weights stay the
    SequentialMLP's own parameters: stacked for each product (forward, and again in backward
    rather than kept alive in between), their gradients accumulated into `main_grad` as
    expert_linear.py does, all experts in one foreach add."""

    @staticmethod
    def forward(ctx, x, offs, rows_expert, linears, *params):
        ctx.linears, ctx.has_bias = linears, linears[0].bias is not None
        ctx.save_for_backward(x, offs, rows_expert)
        out = torch._grouped_mm(x, _stacked(linears, "weight").transpose(1, 2), offs=offs)
        if ctx.has_bias:
            out = out + _stacked(linears, "bias")[rows_expert]
        return out

    @staticmethod
    def backward(ctx, grad):
        x, offs, rows_expert = ctx.saved_tensors
        linears, num = ctx.linears, len(ctx.linears)
        weights = [linear.weight for linear in linears]
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, _stacked(linears, "weight"), offs=offs) \
            if ctx.needs_input_grad[0] else None
        grad_w = list(torch._grouped_mm(grad.t(), x, offs=offs).unbind(0))
        grad_b = [None] * num
        if ctx.has_bias:
            sums = torch.zeros(num, grad.shape[1], dtype=grad.dtype, device=grad.device)
            grad_b = list(sums.index_add_(0, rows_expert, grad).unbind(0))
        return (grad_x, None, None, None, *_to_main_grad(weights, grad_w),
                *(grad_b if ctx.has_bias else ()))


def _to_main_grad(weights: list, grads: list) -> list:
    """Weight gradients for autograd, or (under Megatron's DDP) added to `main_grad` in one
    foreach kernel with placeholders returned, as expert_linear.py's contract."""
    main = [getattr(w, "main_grad", None) for w in weights]
    if main[0] is None:
        return grads
    same = main[0].dtype == grads[0].dtype
    torch._foreach_add_(main, grads if same else [g.to(main[0].dtype) for g in grads])
    out = []
    for w in weights:
        w.grad_added_to_main_grad = True
        make = torch.zeros if getattr(w, "zero_out_wgrad", False) else torch.empty
        out.append(make(w.shape, dtype=w.dtype, device=w.device))
    return out


def grouped_linear(x, offs, rows_expert, linears) -> torch.Tensor:
    params = [linear.weight for linear in linears]
    if linears[0].bias is not None:
        params += [linear.bias for linear in linears]
    return _GroupedLinear.apply(x, offs, rows_expert, linears, *params)


class GroupedExperts(LeanSequentialMLP):
    """The same experts and parameters (SequentialMLP's keys, shards and checkpoints), every
    local expert computed at once with grouped matrix products (`torch._grouped_mm`): one
    fc1, one activation, one fc2 and one routing-weight product per layer, token counts kept
    on the device, an expert without tokens computing nothing. Megatron-LM's
    `--moe-grouped-gemm`; experts with LoRA adapters run the sequential path."""

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        fc1 = [expert.linear_fc1 for expert in self.local_experts]
        fc2 = [expert.linear_fc2 for expert in self.local_experts]
        if not self._lean_applies() or any(getattr(l, "lora", None) is not None
                                           for l in fc1 + fc2):
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs)
        run_pre_hooks(fc1 + fc2)
        x = permuted_local_hidden_states
        counts = tokens_per_expert.to(device=x.device)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        rows_expert = torch.repeat_interleave(torch.arange(len(fc1), device=x.device), counts,
                                              output_size=len(x))
        hidden = self._activation(grouped_linear(x, offs, rows_expert, fc1))
        output = grouped_linear(hidden, offs, rows_expert, fc2)
        return (output * permuted_probs.unsqueeze(-1)).to(output.dtype), None
