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

# The three stages of Table 12 for one backbone: stage N "$short name" "$template"
stage1() {
    N_SAMPLES=${N_SAMPLES:-500000}
    launch --stage 1 --pretrained-checkpoint "$CKPT/$1_init" --load "$CKPT/$1_stage1" \
        --save "$CKPT/$1_stage1" --data-path "$DATA/shards/alignment" --template plain \
        --lr 1e-3 --train-iters "$(iterations 1 "$N_SAMPLES")" "${COMMON[@]}"
}
stage2() {
    N_SAMPLES=${N_SAMPLES:-60000}
    launch --stage 2 --pretrained-checkpoint "$CKPT/$1_stage1" --load "$CKPT/$1_stage2" \
        --save "$CKPT/$1_stage2" --data-path "$DATA/shards/instruct" --template "$2" \
        --lr 2e-5 --train-iters "$(iterations 3 "$N_SAMPLES")" "${COMMON[@]}"
}
stage3() {
    # blend weights: the training-set sizes (each shard folder's report.json counts yours)
    N_SAMPLES=${N_SAMPLES:-45421}
    launch --stage 3 --pretrained-checkpoint "$CKPT/$1_stage3_init" \
        --load "$CKPT/$1_stage3" --save "$CKPT/$1_stage3" --template "$2" \
        --data-path 3064 "$DATA/shards/vqa_rad" 4919 "$DATA/shards/slake" \
        19755 "$DATA/shards/pathvqa" 4708 "$DATA/shards/pneumoniamnist" \
        12975 "$DATA/shards/organcmnist" \
        --expert-model-parallel-size "${EP:-4}" --balanced-modality-batches \
        --lr 2e-5 --train-iters "$(iterations 9 "$N_SAMPLES")" "${COMMON[@]}"
}
