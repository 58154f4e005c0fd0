#!/usr/bin/env bash
# Stage 1 (alignment): bash scripts/pretrain.sh [CONFIG.yaml] [--section.key value ...]
exec bash "$(dirname "$0")/_stage.sh" pretrain "$@"
