"""Nothing lost, nothing silent (issue 14): what `--load` finds, saves that never replace or
move back, recorded checksums, flags checked before anything is built, safetensors named."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from medmoe_mcore.checkpoint import integrity, store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.config.flavors import medmoe_language
from medmoe_mcore.config.model import ModelConfig
from medmoe_mcore.conversion.safetensors_io import CorruptFile, SafetensorsDir
from medmoe_mcore.models.language import LanguageModel
from medmoe_mcore.training.config import TrainConfig
from medmoe_mcore.training.resume import starting_point


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(language=medmoe_language("tiny"))
    return cfg, LanguageModel(cfg)


def _save(model, cfg, root, iteration=None, **kw):
    return store.save(model.sharded_state_dict(), root, cfg, iteration=iteration, **kw)


def test_what_load_finds(tmp_path, tiny):
    cfg, model = tiny
    with pytest.raises(store.NoCheckpoint, match="does not exist"):
        store.resolve(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(store.NoCheckpoint, match="is empty"):
        store.resolve(tmp_path / "empty")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="Hugging Face model .*convert_hf_to_mcore"):
        store.resolve(hf)
    run = tmp_path / "run"
    for it in (10, 20, 40):
        _save(model, cfg, run, it)
    (run / store.TRACKER).unlink()  # the lost marker
    with pytest.raises(ConfigError, match=r"newest 40\); pass --ckpt-step 40"):
        store.resolve(run)
    assert store.resolve(run, step=20).name == "iter_0000020"
    with pytest.raises(ConfigError, match=r"no complete iteration 30.*\[10, 20, 40\]"):
        store.resolve(run, step=30)

    def train(**kw):
        return TrainConfig(stage=2, data_path=["d"], train_iters=4, lr=1e-3, **kw)

    start = starting_point(train(load=str(tmp_path / "missing"), pretrained_checkpoint=str(run
                                                                                          / "iter_0000010")))
    assert not start.resuming and "WARNING: --load" in start.note and "missing" in start.note
    with pytest.raises(ConfigError, match="nothing to resume, and no --pretrained-checkpoint"):
        starting_point(train(load=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="--ckpt-step 40"):  # never a silent fresh start
        starting_point(train(load=str(run), pretrained_checkpoint=str(run / "iter_0000010")))
    tuned = starting_point(train(load=str(run), ckpt_step=20, finetune=True))
    assert tuned.folder.name == "iter_0000020" and not tuned.resuming


def test_saves_never_replace_or_move_back(tmp_path, tiny):
    cfg, model = tiny
    run = tmp_path / "run"
    _save(model, cfg, run, 10)
    for it, text in ((10, "already holds iter_0000010"), (5, "already holds iter_0000010")):
        with pytest.raises(ConfigError, match=text):
            _save(model, cfg, run, it)
    (run / "iter_0000010").rename(run / "iter_0000010.moved")  # the tracker still says 10
    with pytest.raises(ConfigError, match="would move it backwards"):
        _save(model, cfg, run, 8)
    # a conversion into a training run: refused before any work, or replaced whole
    from medmoe_mcore.config.model import MoEConfig
    from medmoe_mcore.conversion.language import import_hf
    from medmoe_mcore.conversion.upcycle import upcycle

    for convert in (lambda: import_hf(tmp_path / "no-hf-folder", run),
                    lambda: upcycle(tmp_path / "no-dense", run, MoEConfig())):
        with pytest.raises(ConfigError, match=r"--save .*run holds a training run \(latest "
                                              r"iteration 10\)"):
            convert()
    with pytest.raises(ConfigError, match=r"holds a training run \(latest iteration 10\)|"
                                          r"holds a checkpoint"):
        _save(model, cfg, run)
    folder = _save(model, cfg, run, overwrite=True)
    assert folder == run / "release" and sorted(p.name for p in run.iterdir()) == \
        ["latest_checkpointed_iteration.txt", "release"]
    with pytest.raises(ConfigError, match="holds a converted checkpoint"):
        store.check_can_save(run, 1)


def test_checksums_name_the_damaged_file(tmp_path, tiny):
    cfg, model = tiny
    folder = _save(model, cfg, tmp_path / "ck")
    manifest = json.loads((folder / integrity.MANIFEST).read_text())
    shard = max((folder / n for n in manifest["files"]), key=lambda p: p.stat().st_size)
    assert integrity.verify(folder)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist())
    shard.write_bytes(bytes(data))
    with pytest.raises(integrity.IntegrityError, match=f"{shard.name}: corrupt"):
        store.load_into(LanguageModel(cfg), tmp_path / "ck")
    shard.write_bytes(bytes(data[:middle]))
    with pytest.raises(integrity.IntegrityError, match=f"{shard.name}: truncated"):
        store.load_into(LanguageModel(cfg), tmp_path / "ck")
    # without the check, a cut shard still names the folder
    with pytest.raises(ConfigError, match="cannot read the checkpoint.*truncated or corrupt"):
        store.load_into(LanguageModel(cfg), tmp_path / "ck", verify=False)
    (folder / integrity.MANIFEST).unlink()
    assert not integrity.verify(folder)  # nothing recorded: said by the caller


@pytest.mark.parametrize("change, text", [
    (dict(lr=-1e-3), "--lr -0.001: must be 0 or more"),
    (dict(seq_length=0), "--seq-length 0: must be a positive integer"),
    (dict(min_lr=1e-2), "--min-lr 0.01: must be between 0 and --lr 0.001"),
    (dict(lr_warmup_fraction=1.5), r"--lr-warmup-fraction 1.5: must be in \[0, 1\]"),
    (dict(save_interval=0), "--save-interval 0: must be a positive integer"),
    (dict(data_path=[""]), "--data-path: empty"),
    (dict(ckpt_step=3), "--ckpt-step without --load"),
    (dict(load="x", override_opt_param_scheduler=True,
          use_checkpoint_opt_param_scheduler=True), "choose one"),
])
def test_flags_refused_before_anything(change, text):
    base = TrainConfig(stage=2, data_path=["d"], train_iters=4, lr=1e-3,
                       pretrained_checkpoint="p")
    with pytest.raises(ConfigError, match=text):
        dataclasses.replace(base, **change).validate(dp=1)


def test_safetensors_damage_is_named(tmp_path):
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    good = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(good[:-100])
    with pytest.raises(CorruptFile, match=r"model.safetensors: truncated: tensor 'w'"):
        SafetensorsDir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(good[:8] + b"{not json" + good[17:])
    with pytest.raises(CorruptFile, match="model.safetensors: corrupt safetensors header"):
        SafetensorsDir(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CorruptFile, match="index.json: unreadable index"):
        SafetensorsDir(tmp_path)


def test_stage_run_refusals_come_before_anything_is_built(tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "pretrain_medmoe", Path(__file__).resolve().parents[2] / "examples" / "pretrain_medmoe.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was about to be built")

    monkeypatch.setattr(example, "train_stage", must_not_run)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    stage = ["--stage", "2", "--data-path", "x", "--train-iters", "2"]
    for argv, text in (
            (["--load", str(tmp_path / "none"), "--lr", "1e-3"],
             "none does not exist: nothing to resume, and no --pretrained-checkpoint"),
            (["--load", str(hf), "--lr", "1e-3"], "hf holds a Hugging Face model"),
            (["--pretrained-checkpoint", str(hf), "--lr=-1e-3"], "--lr -0.001: must be 0"),
            (["--pretrained-checkpoint", str(hf), "--lr", "1e-3", "--seq-length", "0"],
             "--seq-length 0: must be a positive integer")):
        assert example.main(stage + argv) == 2
        assert text in capsys.readouterr().err
