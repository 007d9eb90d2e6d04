"""The HF folders users have: `pytorch_model.bin` (single or sharded with its index) and a
Hugging Face cache entry (`models--org--name` with refs/, snapshots/ links into blobs/) import
bit-exact to the safetensors folder they hold the same weights as; a .bin whose pickle needs
more than tensors is refused naming the file (and runs nothing); a cache link out of its entry
is refused; a sharded export's index is the one transformers' save_pretrained writes."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.fields import ConfigError
from medmoe_mcore.conversion.language import export_hf, import_hf
from medmoe_mcore.conversion.safetensors_io import INDEX
from medmoe_mcore.models.language import LanguageModel
from tests import tiny_hf


def _weights(ckpt):
    model = LanguageModel(store.read_config(ckpt))
    store.load_into(model, ckpt)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _as_bin(hf, out, shards: int):
    """The folder with its safetensors replaced by torch.save'd state dicts (HF's old format)."""
    shutil.copytree(hf, out)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return out
    keys = sorted(state)
    weight_map = {}
    for n in range(shards):
        name = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[n::shards]}
        torch.save(part, out / name)
        weight_map.update(dict.fromkeys(part, name))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return out


def _as_cache_entry(hf, entry):
    """A Hugging Face hub cache entry: files in blobs/, a snapshot of links, refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    (entry / "blobs").mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(hf.iterdir())):
        blob = entry / "blobs" / f"blob{i:03d}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    return entry, snapshot


@pytest.fixture(scope="module")
def reference(tmp_path_factory, single_rank):
    root = tmp_path_factory.mktemp("ref")
    hf = tiny_hf.build("phi", root / "phi")
    import_hf(hf, root / "ckpt", show_progress=False)
    return hf, _weights(root / "ckpt")


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_folders_import_bit_exact(tmp_path, reference, shards):
    hf, expected = reference
    folder = _as_bin(hf, tmp_path / "bin", shards)
    import_hf(folder, tmp_path / "ckpt", show_progress=False)
    _same(_weights(tmp_path / "ckpt"), expected)


@pytest.mark.parametrize("given", ["entry", "snapshot"])
def test_a_cache_entry_or_snapshot_imports_bit_exact(tmp_path, reference, given):
    hf, expected = reference
    entry, snapshot = _as_cache_entry(hf, tmp_path / "hub" / "models--org--tiny-phi")
    import_hf(entry if given == "entry" else snapshot, tmp_path / "ckpt", show_progress=False)
    _same(_weights(tmp_path / "ckpt"), expected)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unsafe_bin_and_escaping_links_are_refused(tmp_path, reference):
    hf, _ = reference
    folder = _as_bin(hf, tmp_path / "bin", 1)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin: refused: its pickle needs more"):
        import_hf(folder, tmp_path / "ckpt", show_progress=False)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    entry, snapshot = _as_cache_entry(hf, tmp_path / "hub" / "models--org--tiny-phi")
    outside = tmp_path / "elsewhere.json"
    outside.write_text((hf / "config.json").read_text())
    (snapshot / "config.json").unlink()
    os.symlink(outside, snapshot / "config.json")
    with pytest.raises(ConfigError, match="config.json: a link to .*outside"):
        import_hf(entry, tmp_path / "ckpt2", show_progress=False)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt2").exists()


def test_sharded_export_index_is_save_pretrained_s(tmp_path, reference):
    from transformers import AutoModelForCausalLM

    hf, _ = reference
    import_hf(hf, tmp_path / "ckpt", show_progress=False)
    export_hf(tmp_path / "ckpt", tmp_path / "ours", show_progress=False,
              max_shard_bytes=100_000)
    AutoModelForCausalLM.from_pretrained(hf).save_pretrained(tmp_path / "theirs",
                                                             max_shard_size="100KB")
    ours, theirs = (json.loads((tmp_path / d / INDEX).read_text()) for d in ("ours", "theirs"))
    assert ours.keys() == theirs.keys() and ours["metadata"].keys() == theirs["metadata"].keys()
    assert ours["metadata"] == theirs["metadata"]
    assert list(ours["weight_map"]) == sorted(ours["weight_map"])
    assert set(ours["weight_map"]) == set(theirs["weight_map"])
    assert all(name.startswith("model-0") and name.endswith(".safetensors")
               for name in ours["weight_map"].values())
