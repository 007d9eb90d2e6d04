"""The conversion engine: matches every source key to exactly one table entry, checks that the
result is exactly the expected key set, then converts lazily one entry at a time.

It stops, listing the keys, on any unmatched, doubly matched or missing key: never a silent
partial checkpoint."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from medmoe_mcore.config.model import LanguageConfig
from medmoe_mcore.conversion.mappings import Mapping

TensorGetter = Callable[[str], torch.Tensor]


class ConversionError(ValueError):
    """Keys that cannot be converted; the message lists them."""


_INDICES = ("i", "j")  # layer, expert


def _regex(pattern: str) -> re.Pattern:
    rx = re.escape(pattern)
    for name in _INDICES:
        rx = rx.replace(r"\{" + name + r"\}", rf"(?P<{name}>\d+)")
    return re.compile(rx + r"\Z")


def _fill(pattern: str, captures: dict) -> str:
    for name in _INDICES:
        pattern = pattern.replace("{" + name + "}", captures.get(name, "{" + name + "}"))
    return pattern


@dataclass(frozen=True)
class _Group:
    mapping: Mapping
    captures: tuple
    sources: tuple[str, ...]
    targets: tuple[str, ...]


def _side(mapping: Mapping, to_megatron: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(source patterns, target patterns) for one direction."""
    return (mapping.hf, (mapping.megatron,)) if to_megatron else ((mapping.megatron,), mapping.hf)


def plan(table: Sequence[Mapping], source_keys: Iterable[str],
         expected_keys: Iterable[str] | None, to_megatron: bool) -> list[_Group]:
    """Match keys to table entries and check coverage; raise ConversionError listing problems.
    `expected_keys=None`: every source key must match, the targets are what they give."""
    compiled = [(m, slot, _regex(p)) for m in table for slot, p in enumerate(_side(m, to_megatron)[0])]
    found: dict[tuple, dict[int, str]] = {}
    unmatched, doubly = [], []
    for key in sorted(source_keys):
        hits = [(m, slot, match) for m, slot, rx in compiled if (match := rx.match(key))]
        if not hits:
            unmatched.append(key)
            continue
        if len(hits) > 1:
            doubly.append(f"{key} (by {', '.join(m.megatron for m, _, _ in hits)})")
            continue
        mapping, slot, match = hits[0]
        ident = (id(mapping), tuple(sorted(match.groupdict().items())))
        found.setdefault(ident, {"mapping": mapping, "captures": match.groupdict()})[slot] = key

    groups, missing_sources = [], []
    for entry in found.values():
        mapping, captures = entry["mapping"], entry["captures"]
        sources_p, targets_p = _side(mapping, to_megatron)
        absent = [_fill(p, captures) for slot, p in enumerate(sources_p) if slot not in entry]
        if absent:
            missing_sources += absent
            continue
        groups.append(_Group(mapping, tuple(sorted(captures.items())),
                             tuple(entry[s] for s in range(len(sources_p))),
                             tuple(_fill(p, captures) for p in targets_p)))

    produced = [t for g in groups for t in g.targets]
    expected = set(produced if expected_keys is None else expected_keys)
    dup = sorted(t for t, n in Counter(produced).items() if n > 1)
    not_provided = sorted(expected - set(produced))
    unexpected = sorted(set(produced) - expected)
    problems = []
    direction = "HF -> Megatron" if to_megatron else "Megatron -> HF"
    for title, keys in (("source keys matched by no table entry", unmatched),
                        ("source keys matched by more than one entry", doubly),
                        ("source keys missing for a partly present entry", missing_sources),
                        ("target keys produced twice", dup),
                        ("expected target keys that no source tensor provides", not_provided),
                        ("target keys the model does not have", unexpected)):
        if keys:
            problems.append(f"{title} ({len(keys)}): " + ", ".join(keys))
    if problems:
        raise ConversionError(f"{direction} conversion refused:\n  " + "\n  ".join(problems))
    return groups


def convert(groups: Sequence[_Group], get: TensorGetter, lm: LanguageConfig,
            to_megatron: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (target key, tensor) one table entry at a time (sources read lazily)."""
    for g in groups:
        tensors = [get(k) for k in g.sources]
        if to_megatron:
            outs = [g.mapping.to_megatron(tensors, lm)]
        else:
            outs = g.mapping.to_hf(tensors[0], lm)
        yield from zip(g.targets, outs)
