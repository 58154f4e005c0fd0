#!/usr/bin/env bash
# The whole tiny pipeline on CPU, from nothing: set up, make synthetic data and tiny checkpoints, train
# (text -> pretrain -> finetune), evaluate on the held-out split next to chance, run the same pipeline on blank
# images as a control, score the held-out split as MMBench, and answer one image question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
LF=.venv/bin/llava-ft
start=$(date +%s)
step() { printf '\n=== %s (%ss)\n' "$1" "$(( $(date +%s) - start ))"; }

step "data and tiny checkpoints"
$PY -m llava_ft.demo.prepare --blank

step "stage 0: text pretraining of the tiny LLM"
$LF train configs/tiny/text.yaml
step "stage 1: pretrain (projector only)"
$LF train configs/tiny/pretrain.yaml
step "stage 2: finetune (projector + LoRA)"
$LF train configs/tiny/finetune.yaml

step "control: the same stages on blank images"
blank=(--data.train '[{path: data/demo/shapes_blank/pretrain.json, image_folder: data/demo/shapes_blank/images}]')
$LF train configs/tiny/pretrain.yaml --train.output_dir work_dirs/tiny_blank/pretrain "${blank[@]}"
blank=(--data.train '[{path: data/demo/shapes_blank/finetune.json, image_folder: data/demo/shapes_blank/images}]')
# (no benchmark during the control's training: its held-out score is taken below, beside the real one's)
$LF train configs/tiny/finetune.yaml --train.output_dir work_dirs/tiny_blank/finetune \
  --train.init_from work_dirs/tiny_blank/pretrain "${blank[@]}" --train.eval_benchmark null

step "held-out evaluation"
$PY -m llava_ft.demo.evaluate work_dirs/tiny/finetune --label "real images " --json work_dirs/tiny/heldout.json
$PY -m llava_ft.demo.evaluate work_dirs/tiny_blank/finetune --data data/demo/shapes_blank --label "blank images" \
  --json work_dirs/tiny_blank/heldout.json

# Fresh report folders: the eval scripts resume from a predictions file left there, and this is a new model.
rm -rf work_dirs/tiny/vqa work_dirs/tiny/mmbench
step "VQA-style evaluation of the held-out split (open-ended answers, as the tiny model was trained)"
$LF eval vqa --checkpoint work_dirs/tiny/finetune --data data/demo/shapes/heldout_vqa.jsonl \
  --images data/demo/shapes/images --output work_dirs/tiny/vqa --prompt-suffix "" --batch-size 64
cat work_dirs/tiny/vqa/results.md

step "MMBench-style circular evaluation of the held-out split"
echo "(the tiny model never saw lettered options in training: this exercises the harness, not the model)"
$LF eval mmbench --checkpoint work_dirs/tiny/finetune --data data/demo/shapes/heldout_mmbench.tsv \
  --output work_dirs/tiny/mmbench --batch-size 64
cat work_dirs/tiny/mmbench/results.md

step "one question about one held-out image"
img=data/demo/shapes/images/04001.png
echo "image: $img"
echo "Q: What shape is it?"
printf 'A: '
$LF chat work_dirs/tiny/finetune --image "$img" --question "What shape is it?" 2>work_dirs/tiny/chat.log

step "done"
echo "stage outputs: work_dirs/tiny/{text,pretrain,finetune}; reports: work_dirs/tiny/*/report.png, summary.json"
echo "evaluation during training: eval loss (val_size) and the held-out VQA score per epoch in report.png,"
echo "summary.json (eval) and tensorboard (--logdir work_dirs/tiny); answers in work_dirs/tiny/finetune/eval_benchmark"
