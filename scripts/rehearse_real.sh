#!/usr/bin/env bash
# Rehearse the real recipe at real shapes on random weights: write stand-ins of InternLM2-Chat-1.8B, CLIP
# ViT-L/14-336 and LLaVA-558K/665K records in their published layouts (llava_ft/testing/standins.py), then
# run the README's commands on configs/llava_internlm2_1_8b/ with only paths and step counts overridden:
# pretrain, finetune (QLoRA r512), train --preflight, chat, export --format hf-llava, and a reload of the
# export in plain transformers that generates over the 576 image tokens. Prints each step's wall time and
# peak RSS, and a total.
#
#   bash scripts/rehearse_real.sh [--small] [--work-dir DIR]
#
# --small (or SCALE=small): the same layouts, tokenizer and commands at narrow, shallow widths (minutes; CI
# runs it); full size needs about 16 GB of memory. DIR (default work_dirs/rehearse, or REHEARSE_DIR) is
# replaced on each run; a folder this script did not make is refused.
set -euo pipefail
small=false
[ "${SCALE:-}" = small ] && small=true
work=${REHEARSE_DIR:-}
while [ $# -gt 0 ]; do
  case $1 in
    --small) small=true; shift ;;
    --work-dir) work=${2:?--work-dir needs a folder}; shift 2 ;;
    *) echo "rehearse_real.sh: unknown argument $1 (usage: [--small] [--work-dir DIR])" >&2; exit 2 ;;
  esac
done
# A folder given is relative to where the script was called from.
[ -n "$work" ] && work=$(realpath -m "$work")
cd "$(dirname "$0")/.."
work=${work:-$PWD/work_dirs/rehearse}
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
LF=.venv/bin/llava-ft

marker=$work/.rehearse_real
if [ -e "$work" ] && [ -n "$(ls -A "$work")" ] && [ ! -e "$marker" ]; then
  echo "rehearse_real.sh: $work exists and was not made by this script; give another --work-dir" >&2
  exit 2
fi
rm -rf "$work"
mkdir -p "$work"
touch "$marker"
figures=$work/figures.tsv

# Runs a command as a child and records its wall time and peak RSS (the largest process among the child and
# the processes it waited for), so the figures do not depend on /usr/bin/time being installed.
MEASURE='
import resource, subprocess, sys, time
name, figures, *cmd = sys.argv[1:]
start = time.monotonic()
rc = subprocess.call(cmd)
seconds = time.monotonic() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
with open(figures, "a") as f:
    f.write(f"{name}\t{seconds:.1f}\t{peak:.2f}\n")
failed = f" FAILED (exit {rc})" if rc else ""
print(f"rehearse: {name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB{failed}", flush=True)
sys.exit(rc)
'
step() {
  local name=$1; shift
  printf '\n=== rehearse: %s\n' "$name"
  "$PY" -c "$MEASURE" "$name" "$figures" "$@"
}

# Loads the export with transformers alone (no llava_ft import), asks one question about one image and checks
# that the image filled its 576 placeholder tokens and went through the projector.
RELOAD='
import sys
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
folder, image = sys.argv[1:]
processor = AutoProcessor.from_pretrained(folder)
model = LlavaForConditionalGeneration.from_pretrained(folder)
features = []
model.model.multi_modal_projector.register_forward_hook(lambda module, args, out: features.append(out.shape))
question = {"type": "text", "text": "What is in the image?"}
messages = [{"role": "user", "content": [{"type": "image"}, question]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
prompt_length = inputs["input_ids"].shape[1]
answer = processor.decode(out[0, prompt_length:], skip_special_tokens=True)
assert "llava_ft" not in sys.modules, "the reload imported llava_ft"
print(f"reload: {placeholders} image tokens in the prompt, projector output {list(features[0])}")
print(f"reload: generated {out.shape[1] - prompt_length} tokens: {answer!r}")
if placeholders != 576 or features[0][-2] != 576:
    sys.exit(f"reload: expected 576 image tokens, got {placeholders} placeholders and {features[0]} features")
'

scale=(); $small && scale=(--small)
step "stand-ins${scale:+ (small)}" "$PY" -m llava_ft.testing.standins "$work" "${scale[@]}"

llm=$work/models/internlm2-chat-1_8b
clip=$work/models/clip-vit-large-patch14-336
data=$work/data/llava
image=$data/coco/train2017/000000000001.jpg
models=(--model.llm "$llm" --model.vision.model "$clip" --data.cache_dir "$work/cache")
pretrain=(configs/llava_internlm2_1_8b/pretrain.yaml "${models[@]}"
  --data.train.0.path "$data/blip_laion_cc_sbu_558k.json"
  --data.train.0.image_folder "$data/LLaVA-Pretrain/images"
  --train.output_dir "$work/pretrain" --train.max_steps 2)
finetune=(configs/llava_internlm2_1_8b/finetune.yaml "${models[@]}"
  --data.train.0.path "$data/llava_v1_5_mix665k.json" --data.train.0.image_folder "$data"
  --train.init_from "$work/pretrain" --train.output_dir "$work/finetune" --train.max_steps 2)

step "pretrain (NF4 LLM, 2 steps)" bash scripts/pretrain.sh "${pretrain[@]}"
step "preflight (finetune)" "$LF" train "${finetune[@]}" --preflight
step "finetune (QLoRA r512, 2 steps)" bash scripts/finetune.sh "${finetune[@]}"
step "chat" "$LF" chat "$work/finetune" --image "$image" --question "What colours are the shapes?" \
  --max-new-tokens 8 </dev/null
step "export hf-llava" "$LF" export "$work/finetune" --format hf-llava --output "$work/export/llava"
step "reload in transformers" "$PY" -c "$RELOAD" "$work/export/llava" "$image"

printf '\n=== rehearse: figures (%s)\n' "$($small && echo small || echo full size)"
awk -F'\t' '
  { printf "rehearse: %-32s %8.1f s  %6.2f GiB\n", $1, $2, $3; total += $2; if ($3 > peak) peak = $3 }
  END { printf "rehearse: %-32s %8.1f s  %6.2f GiB (largest step)\n", "total", total, peak }
' "$figures"
