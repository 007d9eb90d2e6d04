#!/bin/bash
# The paper's data in the trainer's format (docs/data.md), then what stage 3 starts from: the
# modality router trained on the stage-2 checkpoint and the upcycled Med-MoE checkpoint.
# Download first, under RAW [raw] (each dataset's licence applies; nothing here downloads):
#   LLaVA-Med: llava_med_alignment_500k.json, instruct_60k_inline_mention.json, their images
#   VQA-RAD, SLAKE (English), PathVQA: the training questions as LLaVA JSON with images
#     (vqa_rad_train.json, slake_train.json, pathvqa_train.json, one image folder each)
#   MedMNIST: pneumoniamnist.npz, organcmnist.npz (medmnist.com)
#   router.jsonl: ~200 questions per modality with `modality` (CT, MRI, X-Ray, Pathology)
# BACKBONE [phi2] picks the checkpoints of the router and upcycling steps. DRY_RUN=1 prints
# the commands instead of running them.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RAW=${RAW:-raw}
BACKBONE=${BACKBONE:-phi2}
TOOLS="$(dirname "${BASH_SOURCE[0]}")/../../tools"
step() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }

step python "$TOOLS/prepare_data.py" --json "$RAW/llava_med_alignment_500k.json" \
    --image-folder "$RAW/llava_med_images" --output "$DATA/shards/alignment"
step python "$TOOLS/prepare_data.py" --json "$RAW/instruct_60k_inline_mention.json" \
    --image-folder "$RAW/llava_med_images" --output "$DATA/shards/instruct"
for name in vqa_rad slake pathvqa; do
    step python "$TOOLS/prepare_data.py" --json "$RAW/${name}_train.json" \
        --image-folder "$RAW/${name}_images" --output "$DATA/shards/$name"
done
step python "$TOOLS/prepare_data.py" --medmnist "$RAW/pneumoniamnist.npz" --split train \
    --label-names normal,pneumonia --modality X-Ray --output "$DATA/shards/pneumoniamnist"
step python "$TOOLS/prepare_data.py" --medmnist "$RAW/organcmnist.npz" --split train \
    --label-names bladder,femur-left,femur-right,heart,kidney-left,kidney-right,liver,lung-left,lung-right,pancreas,spleen \
    --modality CT --output "$DATA/shards/organcmnist"

# after stage 2: the router (4 experts, one per modality), then the upcycling (top-2)
step python "$TOOLS/train_router.py" --load "$CKPT/${BACKBONE}_stage2" \
    --records "$RAW/router.jsonl" --image-folder "$RAW/router_images" --num-experts 4 \
    --out "$CKPT/${BACKBONE}_router.safetensors"
step python "$TOOLS/upcycle_to_moe.py" --load "$CKPT/${BACKBONE}_stage2" \
    --router "$CKPT/${BACKBONE}_router.safetensors" --num-experts 4 --moe-router-topk 2 \
    --save "$CKPT/${BACKBONE}_stage3_init"
