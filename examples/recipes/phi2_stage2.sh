#!/bin/bash
# Med-MoE on phi2, stage 2 (instruction tuning): projector + language model on LLaVA-Med's
# instruct_60k_inline_mention (filtered), template phi, lr 2e-5, 3 epochs.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
N_SAMPLES=${N_SAMPLES:-60000}
launch --stage 2 --pretrained-checkpoint "$CKPT/phi2_stage1" --load "$CKPT/phi2_stage2" \
    --save "$CKPT/phi2_stage2" --data-path "$DATA/shards/instruct" --template phi \
    --lr 2e-5 --train-iters "$(iterations 3 "$N_SAMPLES")" "${COMMON[@]}"
