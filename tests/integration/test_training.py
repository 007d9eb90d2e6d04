"""Training through examples/pretrain_medmoe.py under torchrun (2 gloo processes): exact resume,
TP/EP resharding of a stage-3 checkpoint, a rank killed mid-save, the whole demo pipeline."""

import json
import tarfile

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_tool
from tests.demo_setup import make_workspace

COMMON = ("--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "96",
          "--lr", "1e-3", "--log-interval", "1")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, single_rank):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _train(*args, nproc=2):
    r = run_tool("examples/pretrain_medmoe.py", *COMMON, *map(str, args), nproc=nproc,
                 timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["losses"], r.stdout


@pytest.mark.slow
def test_interrupt_and_resume_is_bitwise(tmp_path, workspace):
    """With validation interleaved in the interrupted run (not in the reference): evaluation
    changes no training state, and resume stays bitwise."""
    stage2 = ("--stage", "2", "--data-path", workspace["shards"]["stage2"],
              "--pretrained-checkpoint", workspace["init"], "--train-iters", "6",
              "--num-workers", "2")
    valid = ("--valid-data-path", workspace["shards"]["stage3"], "--eval-interval", "2",
             "--eval-iters", "2")
    full, log = _train(*stage2, "--save", tmp_path / "a", "--save-interval", "3")
    assert "consumed samples" in log and "grad norm" in log and "tokens/s" in log
    first, log = _train(*stage2, *valid, "--save", tmp_path / "b", "--exit-interval", "3")
    assert log.count("validation loss at iteration") == 1  # at 2; exit at 3 (saves)
    rest, log = _train(*stage2, *valid, "--save", tmp_path / "b", "--load", tmp_path / "b",
                       "--tensorboard-dir", tmp_path / "tb")
    assert "resumed from" in log and "iteration 3, consumed samples 12" in log
    assert [line.split("|")[0].strip() for line in log.splitlines()
            if "validation loss at" in line] == ["validation loss at iteration 4",
                                                 "validation loss at iteration 6"]
    assert first == full[:3]
    assert rest == full[3:]  # bitwise: same floats after the restart
    assert full[-1] < full[0]
    events = EventAccumulator(str(tmp_path / "tb" / "stage2")).Reload()
    assert [e.step for e in events.Scalars("lm-loss-validation")] == [4, 6]


def _upcycled(tmp_path, workspace):
    from medmoe_mcore.config.model import MoEConfig
    from medmoe_mcore.conversion.upcycle import upcycle
    from medmoe_mcore.router import file as router_file
    from medmoe_mcore.router.file import RouterWeights

    gen = torch.Generator().manual_seed(0)
    router = RouterWeights(torch.randn(4, 64, generator=gen), torch.zeros(4),
                           ["CT", "MRI", "Pathology", "X-Ray"])
    router_file.save(router, tmp_path / "router.safetensors")
    upcycle(workspace["init"], tmp_path / "s3init", MoEConfig(num_experts=4, router_topk=2),
            router_path=tmp_path / "router.safetensors")
    return tmp_path / "s3init"


@pytest.mark.slow
def test_stage3_checkpoint_reshards_tp_ep(tmp_path, workspace):
    start = _upcycled(tmp_path, workspace)
    stage3 = ("--stage", "3", "--data-path", workspace["shards"]["stage3"],
              "--pretrained-checkpoint", start)
    tp2ep2 = ("--tensor-model-parallel-size", "2", "--sequence-parallel",
              "--expert-model-parallel-size", "2")
    # One process at TP1/EP1 and two at TP2/EP2: data-parallel size 1 throughout, so the data
    # loader's state carries over and the losses can be compared.
    ref, _ = _train(*stage3, "--train-iters", "3", "--save", tmp_path / "c", "--save-interval",
                    "2", "--tensorboard-dir", tmp_path / "tb_ref", "--log-params-norm", nproc=1)
    # Saved at TP1/EP1 (iteration 2), continued at TP2+SP/EP2: the next loss equals TP1/EP1's.
    # (4 iterations where the checkpoint's schedule has 3: its schedule is kept, as asked)
    up, _ = _train(*stage3, *tp2ep2, "--train-iters", "4", "--use-checkpoint-opt_param-scheduler",
                   "--load",
                   tmp_path / "c" / "iter_0000002", "--save", tmp_path / "d", "--save-interval",
                   "3", "--tensorboard-dir", tmp_path / "tb_up", "--log-params-norm")
    assert abs(up[0] - ref[2]) < 1e-5, (up, ref)
    # the expert load of iteration 3 (TensorBoard) is the same counted at either layout
    load, norm = {}, {}
    for run in ("ref", "up"):
        events = EventAccumulator(str(tmp_path / f"tb_{run}" / "stage3")).Reload()
        tags = [t for t in events.Tags()["scalars"] if t.startswith("expert-load/")]
        load[run] = {t: next(e.value for e in events.Scalars(t) if e.step == 3) for t in tags}
        norm[run] = next(e.value for e in events.Scalars("params-norm") if e.step == 3)
    # --log-params-norm: each parameter once, whatever the layout (after iteration 3's update)
    assert norm["ref"] > 0 and norm["ref"] == pytest.approx(norm["up"], rel=1e-5)
    assert sorted(load["ref"]) == [f"expert-load/layer{n:02d}/expert{e}" for n in (1, 3)
                                   for e in range(4)]
    assert load["ref"] == pytest.approx(load["up"], abs=1e-6)
    for n in (1, 3):
        assert sum(v for t, v in load["ref"].items() if f"layer{n:02d}" in t) == \
            pytest.approx(1.0)
    # ... and back: saved at TP2/EP2 (iteration 3), continued at TP1/EP1: the same next loss as
    # the TP2/EP2 run that went on from there.
    down, _ = _train(*stage3, "--train-iters", "4", "--use-checkpoint-opt_param-scheduler",
                     "--load", tmp_path / "d" / "iter_0000003",
                     "--save", tmp_path / "e", nproc=1)
    assert abs(down[0] - up[1]) < 1e-5, (down, up)
    # At another data-parallel size the loader cannot resume: refused naming it, before any
    # model is built; --no-load-data-state starts the data order afresh.
    again = (*stage3, "--train-iters", "3", "--load", tmp_path / "c" / "iter_0000002")
    r = run_tool("examples/pretrain_medmoe.py", *COMMON, *map(str, again), nproc=2)
    assert r.returncode != 0 and "data_parallel_size: saved 1, now 2" in r.stderr, r.stderr
    assert "--no-load-data-state" in r.stderr and "initialised" not in r.stdout
    _, log = _train(*again, "--no-load-data-state")
    assert "iteration 2" in log and "started afresh: RNG (other world size), data order" in log


@pytest.mark.parametrize("mode", [(), ("--async-save",)], ids=["sync", "async"])
def test_killed_mid_save_keeps_previous_checkpoint(tmp_path, workspace, single_rank, mode):
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.models.medmoe import MedMoEModel

    r = run_tool("tests/integration/crash_in_save.py", "--init", str(workspace["init"]),
                 "--data-path", str(workspace["shards"]["stage2"]), "--save",
                 str(tmp_path / "ck"), *mode, nproc=2)
    assert r.returncode != 0
    root = tmp_path / "ck"
    assert (root / store.TRACKER).read_text().strip() == "2"
    assert not (root / "iter_0000004").exists() and list(root.glob("iter_0000004.tmp-*"))
    folder = store.resolve(root)
    assert folder.name == "iter_0000002"
    model = MedMoEModel(store.read_config(root))
    store.load_into(model, root)  # loadable
    losses, log = _train("--stage", "2", "--data-path", workspace["shards"]["stage2"],
                         "--pretrained-checkpoint", workspace["init"], "--train-iters", "3",
                         "--use-checkpoint-opt_param-scheduler",
                         "--load", root, "--save", root)
    assert "iteration 2, consumed samples 8" in log and len(losses) == 1


@pytest.mark.slow
def test_demo_pipeline_main_job(main_job):
    """The README's main job, shortened (3 iterations per stage)."""
    r = main_job["run"]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    # Known dependency warnings are filtered; rank 0 says once what they meant.
    assert "Warning" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert r.stdout.count("CPU runtime active") == 1
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary) == {"stage1", "stage2", "stage3", "router_accuracy", "held_out"}
    for stage in ("stage1", "stage2"):
        assert summary[stage][1] < summary[stage][0], (stage, summary[stage])
    # stage 3 validates on the held-out split every iteration here (3 x 4 rounded down to
    # 1); the same batches each time, so it falls more reliably than 3 training batches
    stage3 = r.stdout[r.stdout.index("=== stage 3 ==="):]
    valid = [float(line.split("lm loss value: ")[1].split(" |")[0])
             for line in stage3.splitlines() if "validation loss at iteration" in line]
    assert len(valid) == 3 and valid[-1] < valid[0], valid
    assert "router held-out accuracy" in r.stdout
    held_out = summary["held_out"]  # 9 images x 4 held-out crops x (VQA + classification)
    assert held_out["num_open"] + held_out["num_closed"] == 36
    assert held_out["classification_accuracy"] is not None
    assert (main_job["work_dir"] / "eval" / "expert_activation.png").stat().st_size > 0


def test_training_runs_on_prepared_shards_with_bad_records(tmp_path, workspace):
    """tools/prepare_data.py output (good records kept, bad ones reported) trains; with the
    distributed optimizer and TensorBoard on."""
    from tests.integration.test_prepare_data import mixed_records

    path = mixed_records(tmp_path / "src")
    r = run_tool("tools/prepare_data.py", "--json", str(path), "--image-folder",
                 str(tmp_path / "src" / "images"), "--output", str(tmp_path / "shards"),
                 "--max-chars", "200", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    # blended 3:1 with the demo's stage-2 folder; the log names both, with their sizes
    losses, log = _train("--stage", "2", "--data-path", "3", tmp_path / "shards", "1",
                         workspace["shards"]["stage2"], "--pretrained-checkpoint",
                         workspace["init"], "--train-iters", "2",
                         "--use-distributed-optimizer", "--tensorboard-dir", tmp_path / "tb")
    assert len(losses) == 2 and "in a blend of 2: shards 8 samples (weight 0.75); stage2" in log
    assert "data read this run: shards " in log and " | stage2 " in log
    assert list((tmp_path / "tb" / "stage2").glob("events.out.tfevents.*"))  # one per stage
    # a shard truncated at a record boundary: refused naming the file, before any model
    shard = tmp_path / "shards" / "shard-000000.tar"
    members = tarfile.open(shard).getmembers()
    shard.write_bytes(shard.read_bytes()[:members[2].offset])
    r = run_tool("examples/pretrain_medmoe.py", *COMMON, "--stage", "2", "--data-path",
                 str(tmp_path / "shards"), "--pretrained-checkpoint", str(workspace["init"]),
                 "--train-iters", "2", nproc=2)
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "shard-000000.tar: truncated" in r.stderr and "initialised" not in r.stdout


def _stage3_resumes_bitwise(tmp_path, workspace, flag, extra, logged, iters, saved_key):
    """Stage 3 at EP=2 with a data-layout flag: interrupted halfway and resumed equals
    uninterrupted bitwise; resuming without the flag is refused, naming it."""
    start = _upcycled(tmp_path, workspace)
    stage3 = ("--stage", "3", "--data-path", workspace["shards"]["stage3"],
              "--pretrained-checkpoint", start, "--train-iters", str(iters), "--num-workers",
              "2", "--expert-model-parallel-size", "2", *extra, flag)
    full, log = _train(*stage3, "--save", tmp_path / "a")
    assert logged in log
    half = iters // 2
    first, _ = _train(*stage3, "--save", tmp_path / "b", "--exit-interval", half)
    rest, _ = _train(*stage3, "--save", tmp_path / "b", "--load", tmp_path / "b")
    assert first == full[:half] and rest == full[half:]
    r = run_tool("examples/pretrain_medmoe.py", *COMMON, *map(str, stage3[:-1]), "--save",
                 str(tmp_path / "b"), "--load", str(tmp_path / "b"), "--train-iters",
                 str(iters + 2), "--override-opt_param-scheduler", nproc=2, timeout=600)
    assert r.returncode != 0 and f"{saved_key}: saved True, now False" in r.stderr


def test_expert_paths_scored_alike_at_every_step(tmp_path, workspace):
    """tools/compare_expert_paths.py: each stage-3 step's loss with the grouped and with the
    sequential experts on the same weights and batch, EP=2; the scoring leaves the run as a
    plain run of the same flags."""
    stage3 = ("--stage", "3", "--data-path", workspace["shards"]["stage3"],
              "--pretrained-checkpoint", _upcycled(tmp_path, workspace), "--train-iters", "3",
              "--expert-model-parallel-size", "2")
    plain, _ = _train(*stage3)
    r = run_tool("tools/compare_expert_paths.py", "--out", str(tmp_path / "paths.jsonl"),
                 *COMMON, *map(str, stage3), nproc=2, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert json.loads(lines[-2])["losses"] == plain
    summary = json.loads(lines[-1])["expert_paths"]
    assert summary["steps_with_experts"] == 3 and summary["own_experts_reproduce_every_step"]
    assert summary["largest_relative_difference"] < 1e-5
    records = [json.loads(x) for x in (tmp_path / "paths.jsonl").read_text().splitlines()]
    assert [x["step_loss"] for x in records] == plain


@pytest.mark.slow
def test_balanced_modality_batches_resume_bitwise(tmp_path, workspace):
    _stage3_resumes_bitwise(tmp_path, workspace, "--balanced-modality-batches", (),
                            "modality-balanced micro-batches", 6, "balanced_modality_batches")


@pytest.mark.slow
def test_packed_sequences_train_and_resume_bitwise(tmp_path, workspace):
    """Rows of 256 positions hold two or three of the demo's stage-3 samples."""
    _stage3_resumes_bitwise(tmp_path, workspace, "--pack-sequences", ("--seq-length", "256"),
                            "packed sequences of up to --seq-length tokens", 4,
                            "pack_sequences")


def test_lora_stage3_adapters_reshard_and_resume(tmp_path, workspace):
    """Stage 3 with --lora-rank from a checkpoint without adapters (fresh ones), saved at
    TP1/EP1 and continued at TP2+SP/EP2: the next loss equals the TP1/EP1 run's, the base
    weights are those of the start."""
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.models.medmoe import MedMoEModel

    start = _upcycled(tmp_path, workspace)
    stage3 = ("--stage", "3", "--data-path", workspace["shards"]["stage3"],
              "--pretrained-checkpoint", start, "--lora-rank", "4", "--lora-dropout", "0")
    ref, log = _train(*stage3, "--train-iters", "3", "--save", tmp_path / "c",
                      "--save-interval", "2", nproc=1)
    assert "LoRA: rank 4, alpha 8, dropout 0 on linear_qkv" in log and "adapters fresh" in log
    up, log = _train(*stage3, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                     "--expert-model-parallel-size", "2", "--train-iters", "3",
                     "--load", tmp_path / "c" / "iter_0000002")
    assert "the checkpoint's adapters (rank 4) continue" in log
    assert abs(up[0] - ref[2]) < 1e-5, (up, ref)
    trained, initial = (MedMoEModel(store.read_config(p, ParallelConfig()))
                        for p in (tmp_path / "c", start))
    store.load_into(trained, tmp_path / "c")
    store.load_into(initial, start)
    a, b = trained.state_dict(), initial.state_dict()
    changed = [k for k in b if not k.endswith("_extra_state") and not torch.equal(a[k], b[k])]
    assert changed and all(k.startswith("projector.") for k in changed)  # paper's stage 3
    r = run_tool("examples/pretrain_medmoe.py", *COMMON, *map(str, stage3), "--train-iters",
                 "3", "--lora-rank", "8", "--load", tmp_path / "c")
    assert r.returncode == 2 and "--lora-rank 8: the checkpoint has lora.rank=4" in r.stderr


def test_no_save_optim_and_rng_need_the_load_side_flags(tmp_path, workspace):
    """--no-save-optim / --no-save-rng write checkpoints without those parts; resuming one
    is refused until the run says it starts them afresh (--no-load-optim / --no-load-rng)."""
    from medmoe_mcore.checkpoint import store

    stage2 = ("--stage", "2", "--data-path", workspace["shards"]["stage2"],
              "--pretrained-checkpoint", workspace["init"], "--num-workers", "0")
    _train(*stage2, "--train-iters", "3", "--exit-interval", "2", "--save", tmp_path / "a",
           "--no-save-optim", "--no-save-rng", nproc=1)
    common = store.load_common(store.resolve(tmp_path / "a"))
    assert common["saved_parts"] == {"optimizer": False, "rng": False}
    assert "optimizer" not in common and "rng" not in common
    again = (*stage2, "--train-iters", "3", "--load", tmp_path / "a", "--save", tmp_path / "a")
    r = run_tool("examples/pretrain_medmoe.py", *COMMON, *map(str, again), nproc=1)
    assert r.returncode != 0, r.stdout[-2000:]
    assert "pass --no-load-optim (saved with --no-save-optim), --no-load-rng (saved with " \
           "--no-save-rng)" in r.stderr, r.stderr[-2000:]
    _, log = _train(*again, "--no-load-optim", "--no-load-rng", nproc=1)
    assert "resumed from" in log and "optimizer state (--no-load-optim)" in log


def test_per_token_loss_is_the_mean_over_the_global_batch_tokens(workspace):
    """--calculate-per-token-loss over 2 micro-batches gives the losses (and so the updates)
    of one micro-batch holding the same 4 samples; the default (the mean of the micro-batches'
    means) does not."""
    stage2 = ("--stage", "2", "--data-path", workspace["shards"]["stage2"],
              "--pretrained-checkpoint", workspace["init"], "--num-workers", "0",
              "--train-iters", "3")
    one, _ = _train(*stage2, "--micro-batch-size", "4", nproc=1)
    per_token, _ = _train(*stage2, "--calculate-per-token-loss", nproc=1)
    means, _ = _train(*stage2, nproc=1)
    assert per_token == pytest.approx(one, rel=1e-6, abs=0)
    assert means != pytest.approx(one, rel=1e-6, abs=0)
