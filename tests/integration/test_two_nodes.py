"""Two nodes on one box, as Slurm starts them (docs/training.md): two torchrun agents
(`--nnodes 2 --node-rank 0/1`, c10d rendezvous, one gloo process each) run a stage-3 iteration
at EP = 2 across the two "nodes" with a save, which then resumes at EP = 2 on one node with 2
processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, _free_port, run_tool
from tests.demo_setup import make_workspace

COMMON = ("--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "96",
          "--lr", "1e-3", "--log-interval", "1", "--num-workers", "0")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, single_rank):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _stage3_start(tmp_path, workspace):
    from medmoe_mcore.config.model import MoEConfig
    from medmoe_mcore.conversion.upcycle import upcycle
    from medmoe_mcore.router import file as router_file
    from medmoe_mcore.router.file import RouterWeights

    gen = torch.Generator().manual_seed(0)
    router_file.save(RouterWeights(torch.randn(4, 64, generator=gen), torch.zeros(4),
                                   ["CT", "MRI", "Pathology", "X-Ray"]),
                     tmp_path / "router.safetensors")
    upcycle(workspace["init"], tmp_path / "s3init", MoEConfig(num_experts=4, router_topk=2),
            router_path=tmp_path / "router.safetensors")
    return tmp_path / "s3init"


def test_two_agents_rendezvous_train_save_and_resume_on_one_node(tmp_path, workspace):
    args = ("examples/pretrain_medmoe.py", "--stage", "3", "--data-path",
            str(workspace["shards"]["stage3"]), "--pretrained-checkpoint",
            str(_stage3_start(tmp_path, workspace)), "--expert-model-parallel-size", "2",
            *COMMON)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    port = _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
         str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", *args, "--train-iters", "2",
         "--exit-interval", "1", "--save", str(tmp_path / "run")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    outs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    log = outs[0] + outs[1]
    assert "saved checkpoint at iteration 1" in log, log[-3000:]
    r = run_tool(*args, "--train-iters", "2", "--load", str(tmp_path / "run"), "--save",
                 str(tmp_path / "run"), nproc=2, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "iteration 1, consumed samples 4" in r.stdout
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["losses"]) == 1
