#!/bin/bash
# Med-MoE on stablelm2_1_6b, stage 3 (MoE tuning): experts, meta expert and dense FFNs on VQA-RAD, SLAKE,
# PathVQA (27K) and PneumoniaMNIST, OrganCMNIST (17K), template stablelm, lr 2e-5, 9 epochs,
# 4 experts top-2 + meta expert. Starts from the upcycled stage 2 (prepare_data.sh's last
# steps: the modality router, then tools/upcycle_to_moe.py). EP defaults to 4 of the 8 GPUs.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stage3 stablelm stablelm
