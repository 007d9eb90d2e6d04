#!/bin/bash
# Med-MoE on stablelm2_1_6b, stage 1 (alignment): the projector on LLaVA-Med's alignment set (filtered,
# ~500K), template plain, lr 1e-3, 1 epoch. Starts from the imported backbone + CLIP
# (tools/convert_hf_to_mcore.py, docs/conversion.md); data from prepare_data.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stage1 stablelm stablelm
