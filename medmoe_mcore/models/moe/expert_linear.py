"""An expert linear's matmuls, weight gradient accumulated in place.

Why: with many experts each one sees few tokens, yet its weight gradient is as large as a dense
layer's. Autograd writes it to a fresh tensor that Megatron's DDP hook then adds to
`main_grad`: per expert and step a new weight-sized allocation, a write, a read and an add.
Megatron's own linears avoid that with `gradient_accumulation_fusion` and a CUDA-only kernel;
here `addmm_` does it on any device, under Megatron's contract: `main_grad` takes the gradient,
`grad_added_to_main_grad` says so, and a placeholder gradient (never written) keeps DDP's
per-parameter hook and bucket readiness running. Without a `main_grad` (no DDP wrapper) the
gradient is returned as autograd expects; when `main_grad` has another dtype (bf16 weights,
float32 buffer) it is added as Megatron's unfused path does, with its rounding.

Short token blocks (under WEIGHT_LEFT_BELOW_ROWS) take the products weight-left, `y^T = W x^T`
and `dx^T = W^T dy^T`: MKL streams a large weight better as the left operand when the block is
short. The results are transposed views, and the activation and its gradient keep that layout,
so the elementwise work stays cheap (mixed layouts make it much slower). Longer blocks keep
F.linear's orientation.

MKL's weight-left products also want a row count that is a multiple of 8. A router hands out
any count, so `pad_short_block` appends zero rows to a short block (at most 7) and the expert
slices them off its output; the padded rows' output gradient is zero, so they add exactly
nothing to any weight or bias gradient.

An expert the router gave no token still runs (on zero rows: DDP's hooks must fire for every
parameter), but adds nothing to `main_grad`: `addmm_` with an empty inner dimension still
scales the whole buffer by beta, a read and write of the weight's size.

The measurements behind each choice (crossover, row multiple, idle experts):
docs/benchmarks.md, "MoE layer against its dense FFNs".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Token blocks shorter than this take the weight-left products (the measured crossover).
WEIGHT_LEFT_BELOW_ROWS = 256
# Short blocks are padded to a multiple of this many rows (MKL's kernel width, measured).
WEIGHT_LEFT_ROW_MULTIPLE = 8


class _ExpertLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.weight_left = len(x) < WEIGHT_LEFT_BELOW_ROWS
        if not ctx.weight_left:
            return F.linear(x, weight, bias)
        xt = x.t()
        out_t = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
        return out_t.t()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if not need_x:
            grad_x = None
        elif ctx.weight_left:
            grad_x = torch.mm(weight.t(), grad.t()).t()
        else:
            grad_x = torch.mm(grad, weight)
        grad_w = _weight_grad(weight, grad, x) if need_w else None
        grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _weight_grad(weight, grad, x):
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None:
        return torch.mm(grad.t(), x)
    if len(x) == 0:
        pass  # an expert without tokens adds nothing; addmm_ would still rewrite the buffer
    elif main_grad.dtype == grad.dtype:
        main_grad.addmm_(grad.t(), x)
    else:
        main_grad.add_(torch.mm(grad.t(), x))
    weight.grad_added_to_main_grad = True
    # Megatron's hook adds the returned gradient when `zero_out_wgrad` is set: zeros then;
    # otherwise the placeholder is never read.
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.shape, dtype=weight.dtype, device=weight.device)


def expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """`F.linear(x, weight, bias)` for an expert's local linear (no communication inside)."""
    return _ExpertLinear.apply(x, weight, bias)


def pad_short_block(x: torch.Tensor) -> torch.Tensor:
    """`x` ([rows, hidden]) with zero rows appended up to a multiple of WEIGHT_LEFT_ROW_MULTIPLE
    when the block is short enough for the weight-left products; the caller slices the
    expert's output back to `len(x)` rows."""
    missing = -len(x) % WEIGHT_LEFT_ROW_MULTIPLE
    if missing == 0 or len(x) >= WEIGHT_LEFT_BELOW_ROWS:
        return x
    return F.pad(x, (0, 0, 0, missing))
