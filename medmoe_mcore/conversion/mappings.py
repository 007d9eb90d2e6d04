"""Mapping kinds. Each is a pair of inverse pure functions between HF tensors and one Megatron
tensor; names are patterns where `{i}` stands for a layer index and `{j}` for an expert index. Format only: TP/EP sharding is
Megatron's job (its sharded state dict), never done here."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from medmoe_mcore.config.model import LanguageConfig


@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: tuple[str, ...]

    def to_megatron(self, tensors: Sequence[torch.Tensor], lm: LanguageConfig) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, lm: LanguageConfig) -> list[torch.Tensor]:
        raise NotImplementedError

    def renamed(self, megatron: tuple[str, str], hf: tuple[str, str]) -> "Mapping":
        """The same transform on other names: replace megatron[0] by megatron[1] in the
        Megatron name and hf[0] by hf[1] in every HF name (first occurrence)."""
        out = copy.copy(self)
        object.__setattr__(out, "megatron", self.megatron.replace(*megatron, 1))
        object.__setattr__(out, "hf", tuple(n.replace(*hf, 1) for n in self.hf))
        return out


class Direct(Mapping):
    """Same tensor, same name on both sides (up to the pattern)."""

    def __init__(self, megatron: str, hf: str):
        super().__init__(megatron, (hf,))

    def to_megatron(self, tensors, lm):
        return tensors[0]

    def to_hf(self, tensor, lm):
        return [tensor]


class PaddedVocab(Mapping):
    """Embedding / LM-head rows padded from `vocab_size` to `padded_vocab_size` with zeros."""

    def __init__(self, megatron: str, hf: str):
        super().__init__(megatron, (hf,))

    def to_megatron(self, tensors, lm):
        (t,) = tensors
        if t.shape[0] != lm.vocab_size:
            raise ValueError(f"{self.hf[0]}: {t.shape[0]} rows, expected vocab_size "
                             f"{lm.vocab_size}")
        pad = t.new_zeros((lm.padded_vocab_size - lm.vocab_size, *t.shape[1:]))
        return torch.cat([t, pad]) if pad.shape[0] else t

    def to_hf(self, tensor, lm):
        return [tensor[: lm.vocab_size]]


class QKV(Mapping):
    """Separate q/k/v (weights or biases) <-> Megatron's fused linear_qkv, grouped per query
    group as [q heads of the group, k, v] so that TP row-sharding splits whole groups."""

    def __init__(self, megatron: str, q: str, k: str, v: str):
        super().__init__(megatron, (q, k, v))

    def to_megatron(self, tensors, lm):
        q, k, v = tensors
        ng, hn = lm.num_query_groups, lm.head_dim
        rest = q.shape[1:]
        if q.shape[0] != lm.num_attention_heads * hn or k.shape[0] != ng * hn \
                or v.shape[0] != ng * hn:
            raise ValueError(f"{self.megatron}: q/k/v rows {q.shape[0]}/{k.shape[0]}/"
                             f"{v.shape[0]} do not match heads={lm.num_attention_heads}, "
                             f"groups={ng}, head_dim={hn}")
        fused = torch.cat([q.reshape(ng, -1, hn, *rest), k.reshape(ng, 1, hn, *rest),
                           v.reshape(ng, 1, hn, *rest)], dim=1)
        return fused.reshape(-1, *rest)

    def to_hf(self, tensor, lm):
        ng, hn = lm.num_query_groups, lm.head_dim
        per_group = lm.num_attention_heads // ng
        rest = tensor.shape[1:]
        grouped = tensor.reshape(ng, per_group + 2, hn, *rest)
        q, k, v = torch.split(grouped, [per_group, 1, 1], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


class GatedMLP(Mapping):
    """gate_proj and up_proj <-> Megatron's fused linear_fc1 = [gate; up]."""

    def __init__(self, megatron: str, gate: str, up: str):
        super().__init__(megatron, (gate, up))

    def to_megatron(self, tensors, lm):
        return torch.cat(tensors, dim=0)

    def to_hf(self, tensor, lm):
        return [x.contiguous() for x in torch.chunk(tensor, 2, dim=0)]


class Reshaped(Mapping):
    """Same values, another shape on the Megatron side (CLIP's class embedding [h] <-> [1, 1, h])."""

    def __init__(self, megatron: str, hf: str, megatron_shape: tuple[int, ...]):
        super().__init__(megatron, (hf,))
        object.__setattr__(self, "megatron_shape", megatron_shape)

    def to_megatron(self, tensors, cfg):
        return tensors[0].reshape(self.megatron_shape)

    def to_hf(self, tensor, cfg):
        return [tensor.reshape(-1)]


class Scoped(Mapping):
    """Another mapping placed in a composite model: Megatron name under `megatron_prefix`, HF
    names re-prefixed by the first matching (old, new) pair, shapes read from its own config
    (the vision tower's heads, not the language model's)."""

    def __init__(self, inner: Mapping, megatron_prefix: str,
                 hf_prefixes: Sequence[tuple[str, str]], cfg):
        def moved(name):
            for old, new in hf_prefixes:
                if name.startswith(old):
                    return new + name[len(old):]
            raise ValueError(f"{name}: no HF prefix rule among {list(hf_prefixes)}")

        super().__init__(megatron_prefix + inner.megatron, tuple(moved(n) for n in inner.hf))
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "cfg", cfg)

    def to_megatron(self, tensors, _):
        return self.inner.to_megatron(tensors, self.cfg)

    def to_hf(self, tensor, _):
        return self.inner.to_hf(tensor, self.cfg)


class Replicate(Mapping):
    """One tensor copied to several names: upcycling's dense FFN -> every expert and the meta
    expert. One way only; the engine runs it in the `to_megatron=False` direction, where the
    source is the `megatron` name (the dense key) and the targets are the `hf` names."""

    def __init__(self, source: str, copies: Sequence[str]):
        super().__init__(source, tuple(copies))

    def to_megatron(self, tensors, lm):
        raise NotImplementedError("Replicate is one-way (dense -> copies)")

    def to_hf(self, tensor, lm):
        return [tensor] * len(self.hf)
