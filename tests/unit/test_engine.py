import pytest

from medmoe_mcore.conversion.engine import ConversionError, plan
from medmoe_mcore.conversion.mappings import QKV, Direct

TABLE = (Direct("decoder.layers.{i}.w", "model.layers.{i}.w"),
         QKV("decoder.layers.{i}.qkv", "model.layers.{i}.q", "model.layers.{i}.k",
             "model.layers.{i}.v"),
         Direct("out", "lm_head"))
HF = {"model.layers.0.w", "model.layers.1.w", "lm_head"} | {
    f"model.layers.{i}.{n}" for i in (0, 1) for n in "qkv"}
MG = {"decoder.layers.0.w", "decoder.layers.1.w", "decoder.layers.0.qkv",
      "decoder.layers.1.qkv", "out"}


def test_plan_both_directions_cover_everything():
    groups = plan(TABLE, HF, MG, to_megatron=True)
    assert sorted(t for g in groups for t in g.targets) == sorted(MG)
    back = plan(TABLE, MG, HF, to_megatron=False)
    assert sorted(t for g in back for t in g.targets) == sorted(HF)


def test_unknown_source_key_is_named():
    with pytest.raises(ConversionError, match=r"matched by no table entry \(1\): model.extra"):
        plan(TABLE, HF | {"model.extra"}, MG, to_megatron=True)


def test_missing_part_of_fused_entry_is_named():
    with pytest.raises(ConversionError, match=r"partly present entry \(1\): model.layers.1.k"):
        plan(TABLE, HF - {"model.layers.1.k"}, MG, to_megatron=True)


def test_missing_whole_tensor_is_named():
    with pytest.raises(ConversionError, match=r"no source tensor provides \(1\): out"):
        plan(TABLE, HF - {"lm_head"}, MG, to_megatron=True)


def test_target_the_model_lacks_is_named():
    with pytest.raises(ConversionError, match=r"model does not have \(1\): decoder.layers.1.w"):
        plan(TABLE, HF, MG - {"decoder.layers.1.w"}, to_megatron=True)


def test_doubly_matched_key_is_named():
    table = TABLE + (Direct("copy", "lm_head"),)
    with pytest.raises(ConversionError, match=r"more than one entry \(1\): lm_head"):
        plan(table, HF, MG, to_megatron=True)
