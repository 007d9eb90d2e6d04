"""Hostile HF folders through tools/convert_hf_to_mcore.py (and an absurd expert count through
tools/upcycle_to_moe.py), in one process under a memory limit (tests/integration/
hostile_import.py): each case ends within seconds in a named, one-line error, nothing saved."""

import json

import pytest

from tests import tiny_hf
from tests.conftest import run_tool

EXPECTED = {
    "overlap": r"model.safetensors: tensor 'model.layers.1.self_attn.q_proj.weight' \(bytes "
               r"\d+-\d+\) overlaps tensor 'model.layers.0.self_attn.q_proj.weight'",
    "hole": r"model.safetensors: bytes \d+-\d+ of the data belong to no tensor \(a hole before",
    "shape_vs_bytes": r"model.safetensors: tensor '[^']+': F32 \[[\d, ]+\] needs \d+ bytes",
    "nested_json": r"model.safetensors: corrupt safetensors header \(RecursionError",
    "config_hidden_size": r"the config's sizes disagree with the weights: .* check config.json "
                          r"hidden_size=600000000",
    "config_num_hidden_layers": r"config.json num_hidden_layers=10000000 disagrees with the "
                                r"weights, which hold 3",
    "config_vocab_size": r"check config.json vocab_size=1000000000",
    "config_intermediate_size": r"check config.json intermediate_size=1000000000",
    "no_tokenizer": r"no tokenizer files .* pass --no-tokenizer",
    "corrupt_tokenizer": r"tokenizer files \['tokenizer.json', .*\] cannot be read",
    "upcycle_num_experts": r"--num-experts 1000000: holding the dense checkpoint and its Med-MoE "
                           r"upcycling needs .* GB, this process can allocate",
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base = tiny_hf.build("phi", root / "phi")
    (root / "work").mkdir()
    r = run_tool("tests/integration/hostile_import.py", str(base), str(root / "work"),
                 timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {o["case"]: o for o in map(json.loads, (line for line in r.stdout.splitlines()
                                                   if line.startswith("{")))}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_refused_named_quickly_nothing_saved(outcomes, case):
    import re

    o = outcomes[case]
    assert o["rc"] == 2, o
    assert re.search(EXPECTED[case], o["err"]), o["err"]
    assert "Traceback" not in o["err"] and len(o["err"].strip().splitlines()) == 1, o["err"]
    assert o["seconds"] < 20 and not o["saved"], o


def test_the_import_without_tokenizer_says_what_will_not_work(outcomes):
    o = outcomes["no_tokenizer_allowed"]
    assert o["rc"] == 0 and o["saved"], o
    assert "imported without a tokenizer (--no-tokenizer): training, generation" in o["err"]
