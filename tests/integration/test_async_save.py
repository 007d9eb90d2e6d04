"""--async-save writes the same checkpoint as a synchronous save: the same state saved both
ways gives byte-identical files (but the save-unique id torch writes into `.metadata`) while
the weights change under the background writer; a run saving in the background trains the
same losses, and every checkpoint is complete when it ends and resumes. A kill mid-save:
test_training.py::test_killed_mid_save_keeps_previous_checkpoint[async]."""

import json

import pytest

from tests.conftest import run_tool
from tests.demo_setup import make_workspace

COMMON = ("--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "96",
          "--lr", "1e-3", "--log-interval", "1", "--num-workers", "0")
SAVE_ID = ".metadata"  # holds a random id per save (two synchronous saves differ there too)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, single_rank):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _train(*args):
    r = run_tool("examples/pretrain_medmoe.py", *COMMON, *map(str, args), nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["losses"], r.stdout


def test_the_same_state_saved_in_the_background_is_the_same_bytes(tmp_path, single_rank):
    import torch

    from medmoe_mcore.checkpoint import integrity, store
    from medmoe_mcore.checkpoint.async_save import AsyncSaver
    from medmoe_mcore.config.flavors import medmoe_language
    from medmoe_mcore.config.model import ModelConfig
    from medmoe_mcore.models.medmoe import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(language=medmoe_language("tiny"))
    model = build_model(cfg)
    sync = store.save(model.sharded_state_dict(), tmp_path / "sync", cfg, iteration=3)
    saver = AsyncSaver()
    background = saver.save(model.sharded_state_dict(), tmp_path / "async", cfg, iteration=3)
    with torch.no_grad():  # training goes on while the writer writes
        for p in model.parameters():
            p.add_(1.0)
    assert not (tmp_path / "async" / store.TRACKER).exists()  # not the latest until complete
    saver.close()
    assert (tmp_path / "async" / store.TRACKER).read_text() == "3"
    names = sorted(p.name for p in sync.iterdir())
    assert names == sorted(p.name for p in background.iterdir())  # no writer leftovers
    for name in names:
        if name not in (SAVE_ID, "checksums.json"):
            assert (sync / name).read_bytes() == (background / name).read_bytes(), name
    sums = [json.loads((d / "checksums.json").read_text())["files"] for d in (sync, background)]
    assert {k: v for k, v in sums[0].items() if k != SAVE_ID} == \
        {k: v for k, v in sums[1].items() if k != SAVE_ID}
    assert integrity.verify(background)


def test_a_run_saving_in_the_background(tmp_path, workspace):
    stage2 = ("--stage", "2", "--data-path", workspace["shards"]["stage2"],
              "--pretrained-checkpoint", workspace["init"], "--save-interval", "2")
    sync, _ = _train(*stage2, "--train-iters", "4", "--save", tmp_path / "sync")
    background, log = _train(*stage2, "--train-iters", "4", "--save", tmp_path / "async",
                             "--async-save")
    assert sync == background
    assert log.count("(written in the background)") == 2, log[-2000:]
    assert (tmp_path / "async" / "latest_checkpointed_iteration.txt").read_text() == "4"
    more, log = _train(*stage2, "--train-iters", "5", "--override-opt_param-scheduler",
                       "--load", tmp_path / "async", "--save", tmp_path / "async",
                       "--async-save")
    assert "iteration 4, consumed samples 16" in log and len(more) == 1
