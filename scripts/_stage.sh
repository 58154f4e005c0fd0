#!/usr/bin/env bash
# Shared by pretrain.sh and finetune.sh: run one stage with CONFIG (default: the tiny CPU config) and overrides.
# NPROC=N runs it with torchrun on N processes (gloo on CPU, nccl on GPU). On several machines, start it on each
# with the same NPROC (processes per machine), NNODES (machines), MASTER_ADDR (the first machine's address) and
# MASTER_PORT (default 29500), and NODE_RANK 0 on the first machine, 1, 2, ... on the others.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$1; shift
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=configs/tiny/$stage.yaml
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then config=$1; shift; fi
if [[ "$config" == configs/tiny/* ]]; then
  # The embedded tiny default: synthetic data and tiny checkpoints (made once), then the stages it builds on
  # when their outputs are missing: the pretrained tiny tower both stages read, the text stage the tiny LLM
  # needs before it can read captions, and for the finetune the pretrain it starts from (train.init_from).
  .venv/bin/python -m llava_ft.demo.prepare
  if [ ! -f work_dirs/tiny/tower/tower.json ]; then
    echo "$stage: first the tiny tower it reads (python -m llava_ft.demo.tower)"
    .venv/bin/python -m llava_ft.demo.tower
  fi
  needs=(text)
  [[ "$config" == configs/tiny/finetune.yaml ]] && needs+=(pretrain)
  for need in "${needs[@]}"; do
    if [ ! -f "work_dirs/tiny/$need/llava_ft.yaml" ]; then
      echo "$stage: first the tiny $need stage it builds on (configs/tiny/$need.yaml)"
      # An interrupted run of it (checkpoint-N left, no output) is continued, or redone when no checkpoint
      # is complete, rather than refused.
      again=()
      if compgen -G "work_dirs/tiny/$need/checkpoint-*/trainer_state.json" > /dev/null; then again=(--resume)
      elif compgen -G "work_dirs/tiny/$need/checkpoint-*" > /dev/null; then again=(--overwrite); fi
      .venv/bin/llava-ft train "configs/tiny/$need.yaml" "${again[@]}"
    fi
  done
fi
nproc=${NPROC:-1}
if [ "${NNODES:-1}" -gt 1 ]; then
  for need in NODE_RANK MASTER_ADDR; do
    if [ -z "${!need:-}" ]; then
      echo "$stage: NNODES=$NNODES needs $need (NODE_RANK: 0 on the first machine; MASTER_ADDR: its address)" >&2
      exit 2
    fi
  done
  exec .venv/bin/torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" \
    --master-port "${MASTER_PORT:-29500}" --nproc-per-node "$nproc" -m llava_ft.cli.main train "$config" "$@"
fi
if [ "$nproc" -gt 1 ]; then
  exec .venv/bin/torchrun --standalone --nproc_per_node "$nproc" -m llava_ft.cli.main train "$config" "$@"
fi
exec .venv/bin/llava-ft train "$config" "$@"
