"""--transformer-impl: local by default everywhere, Transformer Engine refused where it is not
installed (naming the flag), and checkpoints portable between backends: no save writes a
module's `_extra_state`, no load asks for one, any other missing key still stops the load."""

import pytest
import torch
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import medmoe_language
from medmoe_mcore.config.model import (ModelConfig, ParallelConfig,
                                       transformer_engine_importable)
from medmoe_mcore.models.medmoe import build_model
from medmoe_mcore.models.specs.backends import LOCAL, announce, backend_for

needs_no_te = pytest.mark.skipif(transformer_engine_importable(),
                                 reason="Transformer Engine is installed here")


class ExtraStateDouble(torch.nn.Module):
    """The key set of a Transformer Engine module: an `_extra_state` entry (TE's FP8
    metadata) that a local module does not have. Stands for TE's key set, not its numerics."""

    def __init__(self):
        super().__init__()
        self.restored = "default"

    def get_extra_state(self):
        return torch.tensor([7])

    def set_extra_state(self, state):
        self.restored = state


def _model(seed: int):
    torch.manual_seed(seed)
    return build_model(ModelConfig(language=medmoe_language("tiny")))


def _saved_keys(folder) -> set[str]:
    return set(load_sharded_metadata(str(store.resolve(folder))))


def test_local_is_the_default_and_announced():
    assert ParallelConfig().transformer_impl == "local"
    assert backend_for("local") is LOCAL
    assert "torch scaled_dot_product_attention" in announce("local")
    assert announce("local").startswith("--transformer-impl local")


@needs_no_te
def test_transformer_engine_without_te_is_refused_naming_the_flag():
    cfg = ModelConfig(language=medmoe_language("tiny"),
                      parallel=ParallelConfig(transformer_impl="transformer_engine"))
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine: Transformer "
                                          "Engine is not installed"):
        cfg.validate()  # before any model is built
    with pytest.raises(ConfigError, match="--transformer-impl"):
        build_model(cfg)


def test_a_checkpoint_loads_into_a_model_with_extra_state(tmp_path, single_rank):
    source = _model(0)
    assert any(k.endswith("._extra_state") for k in source.sharded_state_dict())
    cfg = ModelConfig(language=medmoe_language("tiny"))
    store.save(source.sharded_state_dict(), tmp_path / "local", cfg)
    plain = _saved_keys(tmp_path / "local")
    assert not any("_extra_state" in k for k in plain)  # saving never depends on the backend

    target = _model(1)
    target.te_double = ExtraStateDouble()
    assert "te_double._extra_state" in target.sharded_state_dict()
    store.load_into(target, tmp_path / "local")  # the absent extra state is expected
    assert target.te_double.restored == "default"  # left at its default
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name

    store.save(target.sharded_state_dict(), tmp_path / "with_extra", cfg)
    assert _saved_keys(tmp_path / "with_extra") == plain  # the same keys whoever wrote it


def test_any_other_missing_key_still_stops_the_load(tmp_path, single_rank):
    cfg = ModelConfig(language=medmoe_language("tiny"))
    store.save(_model(0).sharded_state_dict(), tmp_path / "ckpt", cfg)
    target = _model(1)
    target.te_double = ExtraStateDouble()
    target.extra = torch.nn.Linear(2, 2)  # a real weight the checkpoint does not hold
    with pytest.raises(ConfigError, match="extra.weight"):
        store.load_into(target, tmp_path / "ckpt")
