"""The building blocks of the config tree (config/model.py): its error type, fields that are
also CLI flags, and the checks that name the field and the value."""

from __future__ import annotations

from dataclasses import field


class ConfigError(ValueError):
    """A config that cannot work, raised before any compute."""


def option(default, help: str, flag: str | None = None, **extra):
    """A config field that is also a CLI flag (`flag` defaults to --field-name)."""
    return field(default=default, metadata={"help": help, "flag": flag, **extra})


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def require_positive_ints(obj, prefix: str, names) -> None:
    for name in names:
        value = getattr(obj, name)
        require(isinstance(value, int) and value > 0,
                f"{prefix}.{name}={value!r}: must be a positive integer")


def require_divisible(obj, prefix: str, name: str, by: str) -> None:
    value, divisor = getattr(obj, name), getattr(obj, by)
    require(value % divisor == 0,
            f"{prefix}.{name}={value} is not divisible by {prefix}.{by}={divisor}")
