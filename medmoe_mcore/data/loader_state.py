"""A megatron-energon loader state <-> bytes for our checkpoints, read back with
`torch.load(weights_only=True)`: the only classes a saved state may name are energon's own
(its state dataclasses) and numpy's array reconstruction; anything else is refused, so a
checkpoint from elsewhere cannot run code. Energon's `FlexState` (a dict subclass, which
weights_only cannot rebuild) travels as a tagged plain dict.
"""

from __future__ import annotations

import dataclasses
import importlib
import io

import numpy as np
import torch
from megatron.energon.state import FlexState

from medmoe_mcore.config.fields import ConfigError

_FLEX = "__energon_flex_state__"
_NUMPY = ("numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
          "numpy.core.multiarray._reconstruct")


def to_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(_convert(state, to_plain=True), buffer)
    return buffer.getvalue()


def from_bytes(data: bytes, where: str):
    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)):
        module, _, attr = name.rpartition(".")
        if not (module == "megatron.energon" or module.startswith("megatron.energon.")
                or name in _NUMPY):
            raise ConfigError(f"{where}: the data-loader state names {name}, which is not "
                              "megatron-energon's; refused (a checkpoint must not run code)")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            raise ConfigError(f"{where}: the data-loader state names {name}, which this "
                              "megatron-energon does not have (another version?)") from None
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(io.BytesIO(data), weights_only=True)
    return _convert(state, to_plain=False)


def _convert(obj, to_plain: bool):
    if isinstance(obj, FlexState) and to_plain:
        return {_FLEX: {k: _convert(v, to_plain) for k, v in obj.items()}}
    if isinstance(obj, dict):
        if not to_plain and set(obj) == {_FLEX}:
            return FlexState({k: _convert(v, to_plain) for k, v in obj[_FLEX].items()})
        return type(obj)({k: _convert(v, to_plain) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_convert(v, to_plain) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, to_plain) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _convert(getattr(obj, f.name), to_plain)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj
