"""The paper's recipes (examples/recipes/) can never drift from the flags: each stage recipe's
arguments (DRY_RUN=1 prints them) go through the trainer's parser and the configs validate
with Table 12's settings; each data-preparation command parses with its tool's own parser."""

import argparse
import importlib.util
import math
import os
import subprocess
from pathlib import Path

import pytest

from medmoe_mcore.training import megatron_flags

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "examples" / "recipes"
# stage: (lr, epochs, default samples) of Table 12
TABLE_12 = {1: (1e-3, 1, 500000), 2: (2e-5, 3, 60000), 3: (2e-5, 9, 45421)}


def _dry_run(script: Path, **env) -> list[str]:
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True,
                         env={**os.environ, "DRY_RUN": "1", **env})
    return out.stdout.splitlines()


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(RECIPES.glob("*_stage*.sh")), ids=lambda p: p.stem)
@pytest.mark.parametrize("env", [{}, {"GPUS": "4", "GRAD_ACCUM": "8", "N_SAMPLES": "1000"}])
def test_every_stage_recipe_parses_and_validates(script, env):
    import dataclasses

    pretrain = _module(ROOT / "examples" / "pretrain_medmoe.py")
    argv = _dry_run(script, **env)
    train, par, _, _ = pretrain.configs(megatron_flags.parse(pretrain.parser(), argv))
    stage = int(script.stem[-1])
    lr, epochs, samples = TABLE_12[stage]
    gpus, accum = int(env.get("GPUS", 8)), int(env.get("GRAD_ACCUM", 1))
    global_batch = gpus * 2 * accum
    assert (train.stage, train.lr, train.lr_decay_style, train.lr_warmup_fraction) == (
        stage, lr, "cosine", 0.03)
    assert (train.seq_length, train.weight_decay, train.bf16, train.global_batch_size) == (
        2048, 0.0, True, global_batch)
    assert train.train_iters == math.ceil(epochs * int(env.get("N_SAMPLES", samples))
                                          / global_batch)
    assert train.template == ("plain" if stage == 1 else
                              "phi" if script.stem.startswith("phi") else "stablelm")
    # bf16 needs a GPU; everything else is checked here
    dataclasses.replace(train, bf16=False).validate(gpus // par.tensor_model_parallel_size)


def test_the_data_preparation_commands_parse_with_their_tools(monkeypatch):
    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    commands = _dry_run(RECIPES / "prepare_data.sh")
    assert len(commands) == 9
    for line in commands:
        python, tool, *argv = line.split()
        assert python == "python" and Path(tool).is_file(), line
        with pytest.raises(Parsed):
            _module(Path(tool)).main(argv)
