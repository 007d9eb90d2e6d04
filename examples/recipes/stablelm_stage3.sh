#!/bin/bash
# Med-MoE on stablelm2_1_6b, stage 3 (MoE tuning): experts, meta expert and dense FFNs on VQA-RAD, SLAKE,
# PathVQA (27K) and PneumoniaMNIST, OrganCMNIST (17K), template stablelm, lr 2e-5, 9 epochs,
# 4 experts top-2 + meta expert. Starts from the upcycled stage 2 (prepare_data.sh's last
# steps: the modality router, then tools/upcycle_to_moe.py). EP defaults to 4 of the 8 GPUs.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# blend weights: the training-set sizes (each shard folder's report.json counts yours)
N_SAMPLES=${N_SAMPLES:-45421}
launch --stage 3 --pretrained-checkpoint "$CKPT/stablelm_stage3_init" \
    --load "$CKPT/stablelm_stage3" --save "$CKPT/stablelm_stage3" --template stablelm \
    --data-path 3064 "$DATA/shards/vqa_rad" 4919 "$DATA/shards/slake" \
    19755 "$DATA/shards/pathvqa" 4708 "$DATA/shards/pneumoniamnist" \
    12975 "$DATA/shards/organcmnist" \
    --expert-model-parallel-size "${EP:-4}" --balanced-modality-batches \
    --lr 2e-5 --train-iters "$(iterations 9 "$N_SAMPLES")" "${COMMON[@]}"
