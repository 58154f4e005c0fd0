"""A folder of images with the quirks of the real LLaVA-558K/665K releases, for tests: odd modes and shapes that
must load, and the broken files that must be named before training.

    quirks = write_quirks(tmp_path / "images")
    records = quirks_records(quirks)        # one LLaVA record per image, missing one included
    records += peer_records()               # text-only ShareGPT, a conversation opening with the assistant
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Quirks:
    folder: Path
    good: list[str]
    """Images `load_image` reads: grey, CMYK, palette, RGBA, 16-bit, GIF bytes under .jpg, 1x1, a panorama."""
    bad: dict[str, str]
    """Name -> words the problem must contain: truncated, empty, HTML, oversized, missing (not written)."""

    @property
    def names(self) -> list[str]:
        return [*self.good, *self.bad]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) with no pixel data: what a decompression bomb
    looks like until it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def write_quirks(folder: Path) -> Quirks:
    """Write the quirks folder (created if needed) and say which images are good and which are bad."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = _noise(48, 32)
    photo.convert("L").save(folder / "grey.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(folder / "rgba.png")
    ramp = np.linspace(0, 65535, 48 * 32, dtype=np.uint16).reshape(32, 48)
    Image.fromarray(ramp, "I;16").save(folder / "grey16.png")
    photo.save(folder / "gif_bytes.jpg", format="GIF")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one_pixel.png")
    _noise(4000, 60, seed=1).save(folder / "panorama.jpg", quality=90)

    cut = folder / "truncated.jpg"
    _noise(64, 64, seed=2).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "html.jpg").write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    (folder / "oversized.png").write_bytes(_png_header_only(8500, 8500))
    good = ["grey.png", "cmyk.jpg", "palette.png", "rgba.png", "grey16.png", "gif_bytes.jpg", "one_pixel.png",
            "panorama.jpg"]  # fmt: skip
    bad = {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty file",
        "html.jpg": "<!DOCTYPE html",
        "oversized.png": "8500x8500, over the",
        "missing.jpg": "file not found",
    }
    return Quirks(folder, good, bad)


def quirks_records(quirks: Quirks) -> list[dict]:
    """One LLaVA record per image of `quirks` (good ones first, in `quirks.names` order)."""
    return [
        {
            "id": name,
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": f"The file {name}."},
            ],
        }
        for name in quirks.names
    ]


def peer_records() -> list[dict]:
    """Records of the real releases' other shapes: a ShareGPT text-only conversation, and one that opens with
    the assistant (LLaVA-1.5 trains it without that turn)."""
    return [
        {
            "id": "sharegpt",
            "conversations": [
                {"from": "human", "value": "Write a haiku about rain."},
                {"from": "gpt", "value": "Soft rain on the roof."},
                {"from": "human", "value": "Another one?"},
                {"from": "gpt", "value": "Puddles hold the sky."},
            ],
        },
        {
            "id": "opens_with_assistant",
            "conversations": [
                {"from": "gpt", "value": "Hello! Ask me anything."},
                {"from": "human", "value": "What colour is the sky?"},
                {"from": "gpt", "value": "Blue."},
            ],
        },
    ]
