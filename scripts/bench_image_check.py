"""The image check's cost: images/s of a cold check, and what it adds to a cold and a warm `prepare`.

Writes N LLaVA records over N 640x480 JPEGs (16 distinct photos-like pictures, each file its own copy) and a
tokenizer (a tiny InternLM2 one unless --tokenizer), then times, in this process:
  cold: `prepare` into an empty cache, then the image check (`drop_bad_images`, no verdicts yet);
  warm: `prepare` again (a cache hit), then the check again (a stat per image, nothing decoded).
The files were just written, so they are read from the page cache: the figures are decode, not disk, costs.

    .venv/bin/python scripts/bench_image_check.py [--n 20000] [--num-proc N] [--root DIR] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from llava_ft.config import DataSection, DataSource
from llava_ft.data.dataset import data_encoder, drop_bad_images
from llava_ft.data.prepare import prepare
from llava_ft.data.templates import get_template
from llava_ft.data.tokenize import EncodeStats
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.testing.tiny_llm import write_internlm2_tokenizer

IMAGE_TOKENS = 576
WIDTH, HEIGHT = 640, 480
DISTINCT = 16


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Smooth gradients with texture and noise, JPEG quality 90: about the size of a COCO photo at 640x480."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    out = []
    for _ in range(count):
        base = (
            rng.uniform(0, 255, 3)
            + rng.uniform(-0.3, 0.3, 3) * x[..., None]
            + rng.uniform(-0.3, 0.3, 3) * y[..., None]
        )
        texture = 40 * np.sin(x / rng.uniform(5, 40))[..., None] * np.cos(y / rng.uniform(5, 40))[..., None]
        noise = rng.normal(0, 12, (HEIGHT, WIDTH, 3))
        pixels = np.clip(base + texture + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_data(root: Path, n: int) -> Path:
    """N records over N JPEGs under root/images; returns the records file."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    jpegs = photo_jpegs(DISTINCT)
    records = []
    for i in range(n):
        name = f"{i // 1000:03d}/{i:09d}.jpg"  # LLaVA's folders hold about a thousand images each
        (images / name).parent.mkdir(exist_ok=True)
        (images / name).write_bytes(jpegs[i % DISTINCT])
        records.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": f"<image>\nWhat is shown in picture {i}? Describe it briefly."},
            {"from": "gpt", "value": "A smooth gradient with a wavy texture, some noise on top, " * 3}]})  # fmt: skip
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return path


def timed_check(prepared, folder: Path, encoder, data: DataSection) -> tuple[float, object]:
    started = time.perf_counter()
    _, check = drop_bad_images(prepared.dataset, folder, EncodeStats(), skip_bad=False,
                               num_proc=data.num_proc,
                               cache_dir=data.cache_dir, use_cache=True)  # fmt: skip
    return time.perf_counter() - started, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="records and images")
    parser.add_argument(
        "--num-proc", type=int, default=None, help="default: as training picks (data.num_proc)"
    )
    parser.add_argument("--root", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: a tiny InternLM2 one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_image_check.") as tmp:
        root = Path(args.root or tmp)
        started = time.perf_counter()
        path = write_data(root, args.n)
        tok_dir = args.tokenizer or write_internlm2_tokenizer(root / "tok")
        mean_kb = np.mean([f.stat().st_size for f in (root / "images").glob("*/*.jpg")][:DISTINCT]) / 1024
        print(f"wrote {args.n} records and 640x480 JPEGs (mean {mean_kb:.0f} KB) in "
              f"{time.perf_counter() - started:.1f} s under {root}")  # fmt: skip
        tok = load_tokenizer(tok_dir)
        data = DataSection(train=[DataSource(str(path), image_folder=str(root / "images"))], max_length=2048,
                           num_proc=args.num_proc, cache_dir=str(root / "cache"))  # fmt: skip
        encoder = data_encoder(data, tok, get_template(data.template, tok), IMAGE_TOKENS)
        folder = root / "images"
        figures = {}
        for run in ("cold", "warm"):
            prepared = prepare(path, encoder, fmt="llava", num_proc=data.num_proc, cache_dir=data.cache_dir)
            check_s, check = timed_check(prepared, folder, encoder, data)
            figures[run] = (prepared, check_s, check)
            assert prepared.cache == ("built" if run == "cold" else "hit") and not check.problems
        cold, warm = figures["cold"], figures["warm"]
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
              f"{os.getloadavg()[0]:.1f}; tokenizer {type(tok).__name__}")  # fmt: skip
        print(f"check, cold: {cold[2].summary()}: {args.n / cold[1]:,.0f} images/s")
        print(f"check, warm: {warm[2].summary()}: {args.n / warm[1]:,.0f} images/s")
        for run, (prepared, check_s, _) in figures.items():
            print(f"{run} prepare ({prepared.cache}, {prepared.processes} process(es)): {prepared.seconds:.2f} s "
                  f"without the check, {prepared.seconds + check_s:.2f} s with it "
                  f"(+{check_s:.2f} s, +{check_s / prepared.seconds:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
