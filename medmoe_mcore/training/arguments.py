"""Command-line flags generated from the config dataclasses: each `option` field of
TrainConfig, ParallelConfig, MoEConfig (and a tool's own dataclass) becomes one flag with its
name (Megatron-LM's spelling where one exists), type, default, choices and help. Only flags the
user typed are returned, so a run can tell "given" from "defaulted" and refuse what it cannot
honour. Used by examples/ and tools/; reads argv only through the parser they pass in."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import LANGUAGE_FLAVORS
from medmoe_mcore.config.lora import LoRAConfig
from medmoe_mcore.config.model import ModelConfig, MoEConfig


def layer_freq(text: str):
    """'2' -> 2; '[1,0,1,0]' or '1,0,1,0' -> list (Megatron's --moe-layer-freq)."""
    text = text.strip().strip("[]")
    return int(text) if "," not in text else [int(x) for x in text.split(",")]


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(cls, name: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def _kind(hint) -> tuple[Any, tuple | None]:
    """(argparse type or 'bool', choices) of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)  # Optional[X] or X | None
    if union and len(args) == 1:
        return _kind(args[0])  # Optional[X]
    if typing.get_origin(hint) is typing.Literal:
        return type(args[0]), tuple(args)
    if union:  # Union[int, list]: the layer-freq syntax
        return layer_freq, None
    if typing.get_origin(hint) is list:  # list[X]: one or more values
        return ("list", typing.get_args(hint)[0]), None
    return ("bool", None) if hint is bool else (hint, None)


def add_config_arguments(parser: argparse.ArgumentParser, cls, title: str,
                         exclude: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        if f.name in exclude:
            continue
        kind, choices = _kind(hints[f.name])
        choices = f.metadata.get("choices", choices)
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata["help"] + f" (default: {default})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if kind == "bool":
            group.add_argument(flag_of(cls, f.name), action=argparse.BooleanOptionalAction,
                               **kwargs)
        elif isinstance(kind, tuple):
            group.add_argument(flag_of(cls, f.name), type=kind[1], nargs="+",
                               metavar=f.name.upper(), **kwargs)
        else:
            group.add_argument(flag_of(cls, f.name), type=kind, choices=choices,
                               metavar=None if choices else f.name.upper(), **kwargs)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` whose flags were typed."""
    return {f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}


def refuse(args: argparse.Namespace, cls, names, why: str) -> None:
    """Fail naming every typed flag of `names` (flags a run cannot honour)."""
    typed = [flag_of(cls, n) for n in names if hasattr(args, n)]
    if typed:
        raise ConfigError(f"{', '.join(typed)}: {why}")


def moe_config(chosen: dict, router_file: bool) -> MoEConfig:
    """MoEConfig for upcycling: the modality router with a router file, else the learned
    baseline; defaults by router type."""
    chosen = dict(chosen)
    chosen.setdefault("router_type", "modality" if router_file else "learned")
    return MoEConfig.from_choices(chosen)


def matching_flavor(cfg: ModelConfig) -> str | None:
    return next((name for name, lm in LANGUAGE_FLAVORS.items() if lm == cfg.language), None)


def reconcile_with_checkpoint(cfg: ModelConfig, source, moe_given: dict,
                              flavor: str | None) -> list[str]:
    """Check the model-shape and MoE flags of a stage run against the checkpoint's stored
    config, before any model is built: a contradiction fails naming the flag, the given value
    and the checkpoint's; a run-time choice (the token dispatcher) is applied. Returns what
    was applied, one line each."""
    problems, applied = [], []
    if flavor is not None and cfg.language != LANGUAGE_FLAVORS[flavor]:
        actual = matching_flavor(cfg)
        lm = cfg.language
        problems.append(f"--flavor {flavor}: the checkpoint is "
                        + (f"flavor {actual}" if actual else
                           f"another shape (family={lm.family}, hidden_size={lm.hidden_size}, "
                           f"num_layers={lm.num_layers})"))
    if moe_given and cfg.moe is None:
        problems.append(f"{', '.join(flag_of(MoEConfig, n) for n in moe_given)}: the checkpoint "
                        "is dense (moe: none); MoE layers come from upcycling "
                        "(tools/upcycle_to_moe.py, or the demo pipeline)")
    elif moe_given:
        for f in cli_fields(MoEConfig):
            if f.name not in moe_given or moe_given[f.name] == getattr(cfg.moe, f.name):
                continue
            flag, value, stored = flag_of(MoEConfig, f.name), moe_given[f.name], \
                getattr(cfg.moe, f.name)
            if f.metadata.get("runtime"):
                setattr(cfg.moe, f.name, value)
                applied.append(f"applied {flag} {value} (the checkpoint has moe.{f.name}="
                               f"{stored})")
            else:
                problems.append(f"{flag} {value}: the checkpoint has moe.{f.name}={stored}")
    if problems:
        raise ConfigError(f"flags contradict the checkpoint {source}:\n  " +
                          "\n  ".join(problems))
    return applied


def lora_config(chosen: dict, moe: MoEConfig | None, seed: int) -> LoRAConfig | None:
    """The LoRA a run's typed `--lora-*` flags ask for (None without any), checked."""
    if not chosen:
        return None
    if chosen.get("rank") is None:
        raise ConfigError(f"{', '.join(flag_of(LoRAConfig, n) for n in chosen)} without "
                          "--lora-rank")
    lora = LoRAConfig(**chosen, init_seed=seed).resolve_targets(moe)
    lora.validate(moe)
    return lora


def reconcile_lora(cfg: ModelConfig, source, chosen: dict, resuming: bool,
                   seed: int) -> list[str]:
    """LoRA flags against the checkpoint a stage starts from: a checkpoint without adapters
    gets fresh ones when the run starts from its weights (never when it resumes); one with
    adapters keeps them, and a flag that differs from them is refused. Returns log lines."""
    if cfg.lora is None:
        if not chosen:
            return []
        if resuming:
            raise ConfigError(f"{', '.join(flag_of(LoRAConfig, n) for n in chosen)}: the "
                              f"checkpoint {source} was trained without LoRA; a resumed run "
                              "cannot add adapters (start a new run from its weights with "
                              "--pretrained-checkpoint)")
        cfg.lora = lora_config(chosen, cfg.moe, seed)
        lora = cfg.lora
        return [f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on "
                f"{', '.join(lora.target_modules)}; fresh adapters, base weights frozen"]
    differ = [f"{flag_of(LoRAConfig, n)} {v}: the checkpoint has lora.{n}="
              f"{getattr(cfg.lora, n)!r}" for n, v in chosen.items()
              if v != getattr(cfg.lora, n)]
    if differ:
        raise ConfigError(f"flags contradict the checkpoint {source}:\n  " + "\n  ".join(differ))
    return [f"LoRA: the checkpoint's adapters (rank {cfg.lora.rank}) continue training"]
