"""Scaling study on expert count: every point of a sweep (experts, top-k, router type, meta
expert, EP) from the same stage-2 checkpoint and data: router for its expert count, upcycling,
N stage-3 iterations measured, the test file answered and scored (validation loss otherwise).

    # every point in turn, each as its own torchrun job of --nproc-per-node processes
    python tools/scaling_study.py --demo-dir medmoe_demo --study-dir study \\
        --num-experts 2 4 8 16 --moe-router-topk 1 2 --train-iters 30 --lr 1e-3 \\
        --nproc-per-node 2
    # the same points as separate jobs (a cluster runs them in parallel): print the commands
    python tools/scaling_study.py ... --print-commands
    # one point (what each printed command runs)
    torchrun --nproc_per_node 2 tools/scaling_study.py ... --point E8-top2-modality-meta-ep1
    # gather finished points: study.csv, study.json, study.png, study.md
    python tools/scaling_study.py ... --report-only

Resumable: a point with a result.json is done and skipped; an unfinished one starts over.
Per point: parameters total / active (formula, checked against the built model), median step
time and tokens/s, peak memory per rank, expert load (max/mean per expert and per EP rank),
the loss curve, validation loss, router accuracy and scores.
"""

import argparse
import os
import shlex
import subprocess
import sys

# TrainConfig flags the study sets for each point itself
POINT_OWNED = ("stage", "load", "save", "ckpt_step", "finetune", "load_optim", "load_rng",
               "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler",
               "tensorboard_dir", "exit_interval")


def parser() -> argparse.ArgumentParser:
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.study.grid import StudyConfig
    from medmoe_mcore.training.arguments import add_config_arguments
    from medmoe_mcore.training.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_arguments(p, StudyConfig, "the sweep")
    add_config_arguments(p, TrainConfig, "stage-3 training of every point (Megatron-LM flags; "
                         "--pretrained-checkpoint: the stage-2 checkpoint)", exclude=POINT_OWNED)
    add_config_arguments(p, ParallelConfig, "parallelism of every point",
                         exclude=("expert_model_parallel_size",))
    run = p.add_argument_group("running")
    run.add_argument("--point", help="run this one point (under torchrun)")
    run.add_argument("--nproc-per-node", type=int, default=1, help="processes per point")
    run.add_argument("--print-commands", action="store_true",
                     help="print one torchrun command per unfinished point, run nothing")
    run.add_argument("--report-only", action="store_true", help="gather finished points only")
    return p


def configs(args):
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.study.grid import StudyConfig, demo_inputs
    from medmoe_mcore.training.arguments import given
    from medmoe_mcore.training.config import TrainConfig

    study_given, train_given = given(args, StudyConfig), given(args, TrainConfig)
    if study_given.get("demo_dir"):
        for key, value in demo_inputs(study_given["demo_dir"]).items():
            target = study_given if key in ("router_data_path", "test_data", "image_folder") \
                else train_given
            target.setdefault(key, value)
    study = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in study_given.items()})
    train = TrainConfig(**train_given, stage=3)
    if train.pretrained_checkpoint is None:
        raise ConfigError("--pretrained-checkpoint: the stage-2 checkpoint every point starts "
                          "from is needed (or --demo-dir)")
    if train.train_iters is None:
        raise ConfigError("--train-iters: the stage-3 iterations of each point are needed")
    if "modality" in study.moe_router_type and study.router_data_path is None:
        raise ConfigError("--router-data-path: the modality router of each expert count is "
                          "trained on labelled shards (or pass --demo-dir, or sweep only "
                          "--moe-router-type learned)")
    if train.valid_data_path and train.eval_interval is None:
        train.eval_interval = train.train_iters  # validate once, at the end
    if train.valid_data_path and train.eval_iters is None:
        train.eval_iters = 4
    return study, train, ParallelConfig(**given(args, ParallelConfig))


def point_command(args, argv: list[str], name: str) -> list[str]:
    """This run's own flags (as typed) plus --point NAME, under torchrun."""
    argv = [a for a in argv if a != "--print-commands"]
    return ["torchrun", "--standalone", "--nproc_per_node", str(args.nproc_per_node),
            os.path.abspath(__file__), *argv, "--point", name]


def run_point(args, study, train, base, point) -> None:
    """The point's three phases, each in the process groups it needs."""
    import dataclasses

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.data.tokenizer import Tokenizer
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.study import point as study_point
    from medmoe_mcore.study.grid import point_dir
    from medmoe_mcore.training.setup import stage_config

    stage2 = store.resolve(train.pretrained_checkpoint)
    tokenizer = train.tokenizer or str(stage2 / store.TOKENIZER)
    tok = Tokenizer(tokenizer)
    parallel.initialize(ParallelConfig(), seed=train.seed)
    start, router = study_point.prepare(study, point, stage2, tok)
    folder = point_dir(study, point)
    point_train = dataclasses.replace(
        train, stage=3, pretrained_checkpoint=str(start), save=str(folder / "stage3"),
        tensorboard_dir=str(folder / "tb"), tokenizer=tokenizer)
    cfg = stage_config(start, point.parallel(base), point_train)
    parallel.initialize(cfg.parallel, seed=train.seed)
    measured = study_point.train(point, cfg, point_train)
    parallel.initialize(ParallelConfig(), seed=train.seed)
    scores = study_point.score(study, point, tok)
    study_point.write_result(study, point, cfg, measured, router, scores, point_train)
    parallel.log(f"{point.name}: done ({folder / study_point.RESULT})")


def main(argv=None) -> int:
    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.fields import ConfigError
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.study import report
    from medmoe_mcore.study.grid import points
    from medmoe_mcore.study.point import is_done

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        study, train, base = configs(args)
        train.validate(dp=1)
        lm = store.read_config(store.resolve(train.pretrained_checkpoint),
                                       ParallelConfig()).language
        grid, left_out = points(study, lm)
        for world in {p.ep for p in grid}:
            if args.nproc_per_node % world:
                raise ConfigError(f"--expert-model-parallel-size {world} does not divide "
                                  f"--nproc-per-node {args.nproc_per_node}")
    except store.NoCheckpoint as e:  # the stage-2 start (or --demo-dir's)
        print(f"error: --pretrained-checkpoint: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    by_name = {p.name: p for p in grid}
    if args.point is not None:
        if args.point not in by_name:
            print(f"error: --point {args.point}: not in the sweep ({', '.join(by_name)})",
                  file=sys.stderr)
            return 2
        if is_done(study, by_name[args.point]):
            print(f"{args.point}: already done (its result.json is there); skipped")
            return 0
        try:
            run_point(args, study, train, base, by_name[args.point])
        except (ConfigError, ValueError) as e:
            print(f"error: {args.point}: {e}", file=sys.stderr)
            return 2
        return 0
    for line in left_out:
        print(f"left out: {line}")
    todo = [p for p in grid if not is_done(study, p)]
    print(f"{len(grid)} points, {len(grid) - len(todo)} done, {len(todo)} to run")
    if args.print_commands:
        for p in todo:
            print(shlex.join(point_command(args, argv, p.name)))
        return 0
    if not args.report_only:
        for i, p in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {p.name}", flush=True)
            cmd = point_command(args, argv, p.name)
            cmd[0:1] = [sys.executable, "-m", "torch.distributed.run"]
            if subprocess.run(cmd).returncode != 0:
                print(f"error: point {p.name} failed (its log is above); finished points are "
                      "kept, run again to resume", file=sys.stderr)
                return 1
    rows = report.write(study.study_dir, left_out)
    print(report.markdown(rows))
    print(f"study: {len(rows)} points in {study.study_dir}/study.{{csv,json,png,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
