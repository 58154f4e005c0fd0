#!/usr/bin/env bash
# One table: data preparation (llava_ft vs XTuner 0.2.0, records/s per tokenizer and format; 2 processes;
# cold vs warm cache; 200k-record peak RSS) and training tokens/s of packed vs padded vs length-grouped batches.
# XTuner's columns need its side venv: bash scripts/setup_xtuner_bench.sh (a few minutes, under .cache/xtb).
# Usage: bash scripts/benchmark.sh [ROOT=.cache/xtb]   env: N=20000 RUNS=1 SCALE=200000 (SCALE=0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-.cache/xtb}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

if [ ! -d "$ROOT/data" ]; then
  echo "no benchmark records under $ROOT: run  bash scripts/setup_xtuner_bench.sh $ROOT  first"
  exit 1
fi
$PY scripts/bench_packing.py --mix text --max-length 2048 --json-out "$OUT/pack_sft.json" >&2
$PY scripts/bench_packing.py --mix llava --max-length 2048 --pack-length 8192 --json-out "$OUT/pack_llava.json" >&2
$PY scripts/bench_prepare.py --root "$ROOT" --n "${N:-20000}" --runs "${RUNS:-1}" --scale "${SCALE:-200000}" \
  --packing-json "$OUT/pack_sft.json" "$OUT/pack_llava.json" --json-out "$OUT/prepare.json"
