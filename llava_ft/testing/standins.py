"""Random-weight stand-ins for the real recipe's inputs in their published layouts, for scripts/rehearse_real.sh.

InternLM2-Chat-1.8B (bf16 safetensors in two shards with their index, the 92,544-piece sentencepiece
tokenizer), a transformers CLIP ViT-L/14-336 folder (CLIPModel, image processor) and LLaVA-558K / 665K records
over 640x480 JPEGs. `small` keeps every layout, the tokenizer and the 576 image tokens, with narrow, shallow
networks. `python -m llava_ft.testing.standins DIR [--small]` writes them under DIR (see `write_standins`).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from llava_ft.testing.tiny_llm import write_internlm2_sp_model, write_tiny_internlm2
from llava_ft.testing.tiny_vision import write_tiny_hf_clip

INTERNLM2_VOCAB = 92544
LLM_FOLDER = "models/internlm2-chat-1_8b"
CLIP_FOLDER = "models/clip-vit-large-patch14-336"
DATA_FOLDER = "data/llava"
PRETRAIN_FILE = "blip_laion_cc_sbu_558k.json"
PRETRAIN_IMAGES = "LLaVA-Pretrain/images"  # the 558K records' image paths are relative to it
FINETUNE_FILE = "llava_v1_5_mix665k.json"  # its image paths (coco/..., gqa/...) are relative to DATA_FOLDER
IMAGE_SIZE = (640, 480)


@dataclass(frozen=True)
class Shapes:
    llm: dict[str, int]
    """write_tiny_internlm2 shape arguments."""
    vision: dict[str, int]
    """write_tiny_hf_clip tower arguments (image 336, patch 14 in both scales: 576 image tokens)."""
    text: dict[str, Any]
    """CLIPTextConfig fields of the CLIP text tower (loaded by nothing, present as published)."""
    projection_dim: int


PUBLISHED = Shapes(
    llm={
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_layers": 24,
        "num_heads": 16,
        "num_kv_heads": 8,
    },
    vision={"image_size": 336, "patch_size": 14, "width": 1024, "layers": 24, "heads": 16},
    text={
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
    },
    projection_dim=768,
)
SMALL = Shapes(
    llm={"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    vision={"image_size": 336, "patch_size": 14, "width": 64, "layers": 2, "heads": 2},
    text={
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": 32,
    },
    projection_dim=32,
)

# openai/clip-vit-large-patch14-336's preprocessor_config.json: the feature-extractor spelling (sizes as plain
# numbers) that transformers' CLIPImageProcessor still reads.
CLIP_PREPROCESSOR = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 336,
}

# (image under LLaVA-Pretrain/images, caption): the 558K file's layout, one instruction per record.
PRETRAIN_RECORDS = (
    ("00012/000120001.jpg", "Give a brief description of the image.", "red and blue boxes on a grey field"),
    ("00012/000120002.jpg", "Describe the image concisely.", "a yellow circle above a green stripe"),
    ("00453/004530003.jpg", "Write a terse but informative summary of the picture.", "three shapes on a sky"),
    (
        "00453/004530004.jpg",
        "Share a concise interpretation of the image provided.",
        "an orange square, close up",
    ),
)
# The 665K mix's kinds: multi-turn COCO conversations (image first, or after the question as in about half of
# LLaVA-Instruct), short-answer GQA/TextVQA questions, and text-only ShareGPT conversations.
FINETUNE_RECORDS: tuple[dict[str, Any], ...] = (
    {
        "id": "000000000001",
        "image": "coco/train2017/000000000001.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colours are the shapes in the image?"},
            {"from": "gpt", "value": "The shapes are red, blue and yellow on a grey background."},
            {"from": "human", "value": "Which shape is the largest?"},
            {"from": "gpt", "value": "The red rectangle on the left is the largest shape."},
        ],
    },
    {
        "id": "000000000002",
        "image": "coco/train2017/000000000002.jpg",
        "conversations": [
            {"from": "human", "value": "How many circles can you see in this picture?\n<image>"},
            {"from": "gpt", "value": "There are two circles, one above the other."},
        ],
    },
    {
        "id": "2300003",
        "image": "gqa/images/2300003.jpg",
        "conversations": [
            {
                "from": "human",
                "value": "<image>\nIs the square to the left of the circle?\n"
                "Answer the question using a single word or phrase.",
            },
            {"from": "gpt", "value": "Yes"},
        ],
    },
    {
        "id": "a1b2c3d_0",
        "model": "",
        "conversations": [
            {"from": "human", "value": "Explain in one sentence what a learning rate warmup does."},
            {
                "from": "gpt",
                "value": "It raises the learning rate from near zero over the first steps, so early updates "
                "made with poor gradient statistics stay small.",
            },
        ],
    },
)
CHAT_IMAGE = f"{DATA_FOLDER}/{FINETUNE_RECORDS[0]['image']}"
"""The image `llava-ft chat` and the reload are asked about, relative to the stand-ins' folder."""


def write_internlm2_chat_1_8b(out_dir: Path, shapes: Shapes = PUBLISHED) -> Path:
    """An InternLM2-Chat-1.8B folder as published (config, generation config, bf16 safetensors in two shards
    with their index, tokenizer.model of 92,544 pieces whose chat markers tokenizer_config.json renames)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sp_model = write_internlm2_sp_model(
        out_dir / "tokenizer.model",
        add_dummy_prefix=False,
        piece_names="upstream",
        tiktoken_style=True,
        vocab_size=INTERNLM2_VOCAB,
    )
    return write_tiny_internlm2(
        out_dir,
        **shapes.llm,
        vocab_size=INTERNLM2_VOCAB,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tokenizer_model=sp_model,
        shards=2,
        dtype=torch.bfloat16,
    )


def write_clip_vit_l14_336(out_dir: Path, shapes: Shapes = PUBLISHED) -> Path:
    """A transformers CLIP ViT-L/14-336 folder as published: CLIPModel (both towers), its image processor."""
    write_tiny_hf_clip(
        out_dir,
        **shapes.vision,
        hidden_act="quick_gelu",
        text_config=shapes.text,
        projection_dim=shapes.projection_dim,
    )
    (out_dir / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    return out_dir


def write_jpeg(path: Path, seed: int) -> None:
    """A 640x480 photo-sized JPEG of a few coloured shapes on a gradient."""
    rng = random.Random(seed)
    width, height = IMAGE_SIZE
    image = Image.linear_gradient("L").resize(IMAGE_SIZE).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(width - 160), rng.randrange(height - 160)
        box = (x, y, x + rng.randrange(40, 160), y + rng.randrange(40, 160))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)


def write_llava_records(data_dir: Path) -> None:
    """The 558K and 665K files in their published folder layout, with a JPEG for every image they name."""
    pretrain = []
    for k, (image, instruction, caption) in enumerate(PRETRAIN_RECORDS):
        write_jpeg(data_dir / PRETRAIN_IMAGES / image, seed=k)
        conversations = [
            {"from": "human", "value": f"{instruction}\n<image>"},
            {"from": "gpt", "value": caption},
        ]
        pretrain.append({"id": Path(image).stem, "image": image, "conversations": conversations})
    (data_dir / PRETRAIN_FILE).write_text(json.dumps(pretrain, indent=1))
    for k, record in enumerate(FINETUNE_RECORDS):
        if "image" in record:
            write_jpeg(data_dir / record["image"], seed=100 + k)
    (data_dir / FINETUNE_FILE).write_text(json.dumps(list(FINETUNE_RECORDS), indent=1))


def write_standins(root: Path, *, small: bool = False) -> None:
    """root/models/{internlm2-chat-1_8b, clip-vit-large-patch14-336} and root/data/llava/ (the 558K and 665K
    files and their images)."""
    shapes = SMALL if small else PUBLISHED
    write_internlm2_chat_1_8b(root / LLM_FOLDER, shapes)
    write_clip_vit_l14_336(root / CLIP_FOLDER, shapes)
    write_llava_records(root / DATA_FOLDER)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write models/ and data/ into")
    parser.add_argument("--small", action="store_true", help="scaled-down widths and depths, same layouts")
    args = parser.parse_args(argv)
    write_standins(args.root, small=args.small)


if __name__ == "__main__":
    main()
