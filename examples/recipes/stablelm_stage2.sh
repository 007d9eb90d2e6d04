#!/bin/bash
# Med-MoE on stablelm2_1_6b, stage 2 (instruction tuning): projector + language model on LLaVA-Med's
# instruct_60k_inline_mention (filtered), template stablelm, lr 2e-5, 3 epochs.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
N_SAMPLES=${N_SAMPLES:-60000}
launch --stage 2 --pretrained-checkpoint "$CKPT/stablelm_stage1" --load "$CKPT/stablelm_stage2" \
    --save "$CKPT/stablelm_stage2" --data-path "$DATA/shards/instruct" --template stablelm \
    --lr 2e-5 --train-iters "$(iterations 3 "$N_SAMPLES")" "${COMMON[@]}"
