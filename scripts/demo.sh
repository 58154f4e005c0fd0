#!/usr/bin/env bash
# The whole tiny pipeline on CPU, from nothing: set up, make synthetic data and tiny checkpoints, train
# (text -> pretrain -> finetune), train the blank-image control, and end with the held-out table (real vs blank
# images, seen vs unseen colour-shape pairs, open-ended vs multiple choice, next to chance).
# Every stage is `llava-ft train configs/tiny/<stage>.yaml`, run in one Python process (llava_ft.demo.run) so
# torch is imported once, the control beside the real finetune in a child process; each prints its command.
# Extra flags pass through (--seed, --setting, --check, --finetune-epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
.venv/bin/python -m llava_ft.demo.run "$@"
echo "demo wall time after set-up: $(( $(date +%s) - start ))s"
