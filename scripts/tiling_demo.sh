#!/usr/bin/env bash
# Does tiling pay on the tiny default? On CPU, from nothing: set up, make the detail data (the shape of a small
# mark in a 256-px image) and tiny checkpoints, train configs/tiny_tiling at fixed resolution and with
# any-resolution tiling, train the blank-image control, and print the held-out accuracies side by side.
# Every stage is `llava-ft train configs/tiny_tiling/<stage>.yaml`, run in one Python process
# (llava_ft.demo.tiling); each prints its command. Extra flags pass through (--seed, --check).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
.venv/bin/python -m llava_ft.demo.tiling "$@"
echo "tiling demo wall time after set-up: $(( $(date +%s) - start ))s"
