"""Train with saves every 2 iterations; rank 0 dies in the middle of the second save (after
the shards are written, before the folder is renamed and the tracker moves; with --async-save,
while its background writer is writing them)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--async-save", action="store_true")
    args = p.parse_args()

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from medmoe_mcore.checkpoint import store
    from medmoe_mcore.config.model import ParallelConfig
    from medmoe_mcore.runtime import parallel
    from medmoe_mcore.training.config import TrainConfig
    from medmoe_mcore.training.trainer import Trainer

    real_save, saves = dist_checkpointing.save, []

    def dying_save(state, folder, *a, **k):
        request = real_save(state, folder, *a, **k)
        saves.append(folder)
        if request is not None and len(saves) == 2 and dist.get_rank() == 0:
            write = request.async_fn

            def write_then_kill_the_rank(*wa, **wk):
                write(*wa, **wk)  # in the background writer: shards written, not finalised
                import psutil  # the rank's node dies: the rank and every process it started

                rank = psutil.Process(os.getppid())
                for child in rank.children(recursive=True):
                    if child.pid != os.getpid():
                        child.kill()
                rank.kill()
                os._exit(17)

            return request._replace(async_fn=write_then_kill_the_rank)
        if len(saves) == 2 and dist.get_rank() == 0:
            # Killed mid-save, with its helper processes (as when a node dies): shards on
            # disk, nothing renamed, the tracker untouched.
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()
            os._exit(17)
        return request

    dist_checkpointing.save = dying_save
    cfg = store.read_config(args.init, ParallelConfig())
    parallel.initialize(cfg.parallel)
    Trainer(cfg, TrainConfig(stage=2, data_path=args.data_path,
                             tokenizer=os.path.join(args.init, "release", "tokenizer"),
                             train_iters=4, micro_batch_size=2, global_batch_size=4,
                             seq_length=96, lr=1e-3, save=args.save, save_interval=2,
                             pretrained_checkpoint=args.init, log_interval=1,
                             async_save=args.async_save)).run()


if __name__ == "__main__":
    main()
