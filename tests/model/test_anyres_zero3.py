"""ZeRO-3 with any-resolution images: two processes (torchrun, gloo on CPU), one with a tiled image and one
with text only (the dummy image), train the projector and its newline without hanging, the ranks agreeing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_ft.testing.tiny_vision import write_tiny_hf_clip

pytest.importorskip("deepspeed")

WORKER = """
import json, os, sys

import deepspeed
import numpy as np
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from llava_ft.config import AnyresSection, ModelSection, VisionSection
from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.tiles import pixel_inputs
from llava_ft.data.collate import Collator
from llava_ft.model.build import build_vision
from llava_ft.model.llava import LlavaModel
from llava_ft.model.projector import build_projector

deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
torch.manual_seed(0)
vision = VisionSection(backend="hf", model=sys.argv[1], anyres=AnyresSection())
tower = build_vision(ModelSection(vision=vision)).requires_grad_(False)
llm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
llm.requires_grad_(False)
model = LlavaModel(llm, tower, build_projector("mlp2x_gelu", tower.hidden_size, 32, newline=True)).train()
before = model.projector.image_newline.detach().clone()
config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
params = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=config)
losses = []
for step in range(2):
    ids = [5, 6, 7]
    item = {"input_ids": ids, "labels": ids}
    if rank == 0:  # a 40x90 image: a base view and three tiles
        image = Image.fromarray(np.random.default_rng(step).integers(0, 256, (40, 90, 3), dtype=np.uint8))
        n = model.image_tokens.num_tokens(40, 90)
        item = {"input_ids": [*ids, *[IMAGE_TOKEN_INDEX] * n, 8], "labels": [*ids, *[IGNORE_INDEX] * n, 8],
                **pixel_inputs(tower.processor, [image])}
    loss = engine(**Collator(pad_token_id=0)([item])).loss
    engine.backward(loss)
    engine.step()
    losses.append(float(loss.detach()))
with deepspeed.zero.GatheredParameters([model.projector.image_newline]):
    after = model.projector.image_newline.detach().clone()
# One file per rank: two processes printing to one pipe can interleave their lines.
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "losses": losses, "moved": float((after - before).abs().max()),
               "after": after.tolist()}, f)
# Leave together and close gloo before exit: a rank exiting with gloo's threads alive can abort at teardown.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_zero3_two_ranks_tiled_image_and_text_only(tmp_path) -> None:
    clip = write_tiny_hf_clip(tmp_path / "clip", image_size=32, patch_size=8, width=32)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(Path(__file__).parents[2]),
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(worker), str(clip), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(len(r["losses"]) == 2 for r in reports)
    # The tiled image's rank trains the newline; both ranks hold the same whole parameter afterwards.
    assert reports[0]["moved"] > 0 and reports[0]["after"] == reports[1]["after"]
