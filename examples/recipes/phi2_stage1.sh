#!/bin/bash
# Med-MoE on phi2, stage 1 (alignment): the projector on LLaVA-Med's alignment set (filtered,
# ~500K), template plain, lr 1e-3, 1 epoch. Starts from the imported backbone + CLIP
# (tools/convert_hf_to_mcore.py, docs/conversion.md); data from prepare_data.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
N_SAMPLES=${N_SAMPLES:-500000}
launch --stage 1 --pretrained-checkpoint "$CKPT/phi2_init" --load "$CKPT/phi2_stage1" \
    --save "$CKPT/phi2_stage1" --data-path "$DATA/shards/alignment" --template plain \
    --lr 1e-3 --train-iters "$(iterations 1 "$N_SAMPLES")" "${COMMON[@]}"
