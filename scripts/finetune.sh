#!/usr/bin/env bash
# Stage 2 (instruction): bash scripts/finetune.sh [CONFIG.yaml] [--section.key value ...]
exec bash "$(dirname "$0")/_stage.sh" finetune "$@"
