"""scripts/rehearse_real.sh --small: the real recipe's commands on stand-ins in the published layouts, run as a
user runs the script, and the stand-ins themselves (llava_ft/testing/standins.py)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from sentencepiece import SentencePieceProcessor

from llava_ft.data.tokenizer import INTERNLM2_SPECIAL_TOKENS, load_tokenizer
from llava_ft.testing.standins import INTERNLM2_VOCAB, SMALL, write_internlm2_chat_1_8b, write_standins
from llava_ft.testing.tiny_llm import UPSTREAM_SPECIAL_PIECES, write_internlm2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "stand-ins (small)",
    "pretrain (NF4 LLM, 2 steps)",
    "preflight (finetune)",
    "finetune (QLoRA r512, 2 steps)",
    "chat",
    "export hf-llava",
    "reload in transformers",
]
FIGURE = re.compile(r"^rehearse: (.+): ([\d.]+) s, peak RSS ([\d.]+) GiB$", re.M)
TOTAL = re.compile(r"^rehearse: total +([\d.]+) s +([\d.]+) GiB \(largest step\)$", re.M)
PROBES = ("Hello  there\nfriend", "def f(x):\n\treturn x;\n", "<filler_7> is text", "日本語のテキスト 123")


@pytest.mark.slow
def test_rehearsal_at_small_shapes_passes_and_reports_its_figures(tmp_path):
    work = tmp_path / "rehearse"
    env = {k: v for k, v in os.environ.items() if k not in ("SCALE", "REHEARSE_DIR")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "rehearse_real.sh"), "--small", "--work-dir", str(work)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout

    figures = {name: (float(s), float(gib)) for name, s, gib in FIGURE.findall(out)}
    assert list(figures) == STEPS, out
    assert all(s > 0 and gib > 0 for s, gib in figures.values()), figures
    total = TOTAL.search(out)
    assert total, out
    assert float(total[1]) == pytest.approx(sum(s for s, _ in figures.values()), abs=0.1 * len(STEPS))
    assert float(total[2]) == max(gib for _, gib in figures.values())
    assert re.search(r"^estimate: 2 optimizer steps x ", out, re.M), out  # the preflight's own figures

    assert "reload: 576 image tokens in the prompt, projector output [1, 576, 64]" in out
    # llava_ft's chat (adapters unmerged) and transformers on the export (merged) answer alike, greedily.
    chat = out.split("=== rehearse: chat\n")[1].split("\nrehearse: chat: ")[0].splitlines()[-1]
    reloaded = ast.literal_eval(re.search(r"^reload: generated 8 tokens: (.+)$", out, re.M)[1])
    assert chat.strip() == reloaded.replace("\\", "\\\\").replace("\n", "\\n").strip()
    for stage in ("pretrain", "finetune"):
        assert json.loads((work / stage / "summary.json").read_text())["steps"] == 2
    assert (work / "export" / "llava" / "config.json").is_file()


def test_a_second_run_replaces_its_folder_and_refuses_anyone_elses(tmp_path):
    """The script empties its work folder on each run: one it did not make is left alone."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "rehearse_real.sh"), "--small", "--work-dir", str(foreign)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{foreign} exists and was not made by this script" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "keep"


def test_standin_llm_has_the_published_layout(tmp_path):
    llm = write_internlm2_chat_1_8b(tmp_path / "llm", SMALL)
    config = json.loads((llm / "config.json").read_text())
    assert config["vocab_size"] == INTERNLM2_VOCAB and config["torch_dtype"] == "bfloat16"
    assert config["max_position_embeddings"] == 32768 and config["rope_theta"] == 1e6
    index = json.loads((llm / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert all((llm / shard).is_file() for shard in shards)
    sp = SentencePieceProcessor(model_file=str(llm / "tokenizer.model"))
    assert sp.get_piece_size() == INTERNLM2_VOCAB
    first_marker = INTERNLM2_VOCAB - len(UPSTREAM_SPECIAL_PIECES)
    assert [sp.id_to_piece(i) for i in range(first_marker, INTERNLM2_VOCAB)] == list(UPSTREAM_SPECIAL_PIECES)
    tokenizer = load_tokenizer(llm)
    assert tokenizer.convert_tokens_to_ids(list(INTERNLM2_SPECIAL_TOKENS)) == list(range(92538, 92544))


def test_filler_pieces_never_come_out_of_text(tmp_path):
    """Padding the vocabulary to the published size leaves every text's ids as the unpadded tokenizer's."""
    padded = load_tokenizer(write_internlm2_chat_1_8b(tmp_path / "llm", SMALL))
    plain = load_tokenizer(
        write_internlm2_tokenizer(
            tmp_path / "plain", add_dummy_prefix=False, piece_names="upstream", tiktoken_style=True
        )
    )
    for text in PROBES:
        assert padded(text)["input_ids"] == plain(text)["input_ids"], text


def test_standins_write_the_recipe_inputs(tmp_path):
    write_standins(tmp_path, small=True)
    clip = json.loads((tmp_path / "models/clip-vit-large-patch14-336/config.json").read_text())
    assert clip["architectures"] == ["CLIPModel"] and "text_config" in clip
    vision = clip["vision_config"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == 576
    data = tmp_path / "data" / "llava"
    pretrain = json.loads((data / "blip_laion_cc_sbu_558k.json").read_text())
    finetune = json.loads((data / "llava_v1_5_mix665k.json").read_text())
    images = [data / "LLaVA-Pretrain" / "images" / r["image"] for r in pretrain]
    images += [data / r["image"] for r in finetune if "image" in r]
    for path in images:
        with Image.open(path) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (640, 480), "RGB"), path
    assert any("image" not in r for r in finetune)  # the 665K mix holds text-only conversations
