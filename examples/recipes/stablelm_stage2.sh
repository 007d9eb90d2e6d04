#!/bin/bash
# Med-MoE on stablelm2_1_6b, stage 2 (instruction tuning): projector + language model on LLaVA-Med's
# instruct_60k_inline_mention (filtered), template stablelm, lr 2e-5, 3 epochs.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stage2 stablelm stablelm
