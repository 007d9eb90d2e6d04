"""The main job with both expert computations scored at every training iteration, on the same
weights and the same micro-batches.

The run trains as examples/pretrain_medmoe.py does, with the experts its flags choose (the
sequential experts, or the grouped ones under --moe-grouped-gemm). Before each step of a model
with experts it also computes that step's loss forward-only twice: once with the sequential
experts (LeanSequentialMLP) and once with the grouped ones (GroupedExperts). They are the same
module and parameters, so only the class is switched. Every RNG is put back, so the step itself
is unchanged.

Two free-running trainings drift apart once float32 rounding is amplified. This separates that
drift from the two computations' difference in a single step.

    torchrun --nproc_per_node 2 tools/compare_expert_paths.py --out paths.jsonl \
        --work-dir /tmp/paths [the main job's flags]

Writes --out (JSON lines), one line per step with experts: stage, iteration, the step's own
loss, the sequential and grouped losses, and their relative difference. It checks that the
run's own experts reproduce the step's loss exactly, and prints a summary line.
"""

import argparse
import json
import sys
from pathlib import Path


def shadow_losses(records: list):
    """Wrap Trainer._losses: a training step's micro-batches are first scored with each
    expert class, forward-only and without gradients, and then the step runs as usual."""
    import torch

    from medmoe_mcore.models.moe.experts import GroupedExperts, LeanSequentialMLP
    from medmoe_mcore.training import setup as training_setup
    from medmoe_mcore.training.resume import rng_state, set_rng_state
    from medmoe_mcore.training.trainer import Trainer

    original = Trainer._losses

    def losses(self, micro, forward_only):
        experts = [m for m in self.setup.ddp.modules() if isinstance(m, LeanSequentialMLP)]
        if forward_only or not experts:
            return original(self, micro, forward_only)
        own = type(experts[0])
        scored, rng = {}, rng_state()
        try:
            # as evaluate(): with --overlap-param-gather every parameter current first
            with torch.no_grad(), training_setup.params_in_sync(self.setup.ddp):
                for name, cls in (("sequential", LeanSequentialMLP), ("grouped", GroupedExperts)):
                    for m in experts:
                        m.__class__ = cls
                    scored[name] = self._mean_over_dp(original(self, micro, True))
                    set_rng_state(rng)
        finally:
            for m in experts:
                m.__class__ = own
        result = original(self, micro, forward_only)
        step = self._mean_over_dp([x.detach() for x in result])
        mine = scored["grouped" if own is GroupedExperts else "sequential"]
        seq, grp = scored["sequential"], scored["grouped"]
        records.append({"stage": self.train.stage, "iteration": self.progress.iteration + 1,
                        "step_loss": step, "sequential": seq, "grouped": grp,
                        "relative_difference": abs(grp - seq) / abs(seq),
                        "own_experts_reproduce_step": mine == step})
        return result

    Trainer._losses = losses


def summary(records: list) -> dict:
    worst = max(records, key=lambda r: r["relative_difference"])
    diffs = sorted(r["relative_difference"] for r in records)
    return {"steps_with_experts": len(records),
            "largest_relative_difference": worst["relative_difference"],
            "at": {"stage": worst["stage"], "iteration": worst["iteration"]},
            "median_relative_difference": diffs[len(diffs) // 2],
            "steps_beyond_1e-5": sum(d > 1e-5 for d in diffs),
            "own_experts_reproduce_every_step": all(r["own_experts_reproduce_step"]
                                                    for r in records)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="expert_paths.jsonl", help="per-step records (JSON lines)")
    args, rest = p.parse_known_args(argv)
    from medmoe_mcore.examples import pretrain_medmoe  # the main job (installed with the package)

    records = []
    shadow_losses(records)
    code = pretrain_medmoe.main(rest)
    from medmoe_mcore.runtime.parallel import is_rank0

    if code != 0 or not is_rank0():
        return code
    if not records:
        print("error: no training step with experts ran (stage 3 or the pipeline's stage 3 "
              "is needed)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"expert_paths": summary(records), "written": str(out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
