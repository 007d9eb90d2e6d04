# Shared by the recipes: the paper's Table 12 settings, iterations from the data size, and
# the launch (or, with DRY_RUN=1, the trainer's arguments one per line, for checking).
# Set in the environment (defaults in brackets):
#   GPUS [8] per node, NODES [1], MICRO_BATCH [2], GRAD_ACCUM [1]   global batch = their product
#   N_SAMPLES [the paper's data size of the stage]   CKPT [ckpt]   DATA [data]   TP [1]
set -euo pipefail
GPUS=${GPUS:-8}
NODES=${NODES:-1}
MICRO_BATCH=${MICRO_BATCH:-2}
GRAD_ACCUM=${GRAD_ACCUM:-1}
TP=${TP:-1}
CKPT=${CKPT:-ckpt}
DATA=${DATA:-data}
GLOBAL_BATCH=$((GPUS * NODES * MICRO_BATCH * GRAD_ACCUM / TP))

# iterations of EPOCHS passes over N samples at the global batch, rounded up
iterations() { echo $(( ($1 * $2 + GLOBAL_BATCH - 1) / GLOBAL_BATCH )); }

# Table 12, every stage: cosine decay, 3 % warm-up, no weight decay, bf16, 2,048 tokens
COMMON=(--micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
        --tensor-model-parallel-size "$TP" --seq-length 2048 --lr-decay-style cosine
        --lr-warmup-fraction 0.03 --min-lr 0 --weight-decay 0 --clip-grad 1.0 --bf16
        --use-distributed-optimizer --save-interval 500 --log-interval 10
        --exit-signal-handler --tensorboard-dir "$CKPT/tensorboard")

launch() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%s\n' "$@"
    else
        torchrun --nnodes "$NODES" --nproc-per-node "$GPUS" \
            "$(dirname "${BASH_SOURCE[0]}")/../pretrain_medmoe.py" "$@"
    fi
}
