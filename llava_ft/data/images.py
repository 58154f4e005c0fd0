"""Image loading and CLIP preprocessing, written once so training, chat, eval and export agree.

`ImageProcessor` reproduces open_clip's eval transform (bicubic shortest-side resize, center crop,
normalize) with PIL, plus LLaVA-1.5's pad-to-square with the mean colour. It equals transformers'
`LlavaImageProcessor(do_pad=True)` with the PIL backend, which is what an exported model is served with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from llava_ft.data.conversation import DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Far above any training image (LLaVA's largest are a few Mpx) but below what exhausts RAM on decode.
MAX_PIXELS = 64_000_000

Aspect = Literal["pad", "resize", "crop"]

# Transparent pixels are shown on white, as transformers' convert_to_rgb (what an exported model's image
# processor runs) and image viewers show them: the model sees in training what it sees after export.
TRANSPARENT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Integer and float modes whose values PIL's convert("RGB") clips to 0-255 instead of scaling.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = TRANSPARENT_BACKGROUND) -> Image.Image:
    """The RGB a viewer shows: high-depth greys scaled to 8 bits (16-bit to its top byte, rounded; float as
    0-1 when no value exceeds 1, else clipped to 0-255), transparency composited on `background`, every other
    mode (palette, CMYK, YCbCr, 1-bit, grey) through PIL's conversion."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_MODES:
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        else:  # 16-bit data, also when PIL opens it as 32-bit "I"
            scale = 1 / 257 if values.size and values.max() > 255 else 1.0
        grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBa", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as RGB (`to_rgb`); any failure is a `DataError` naming the path. The one
    definition of a readable image: `image_problem` (the check before training) asks this.

    EXIF orientation is not applied, as in LLaVA's loader, so features match the reference pipeline.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise DataError(where, "image file not found")
    if os.path.getsize(where) == 0:
        raise DataError(where, "not a readable image (empty file)")
    try:
        img = Image.open(where)
    except Image.DecompressionBombError as e:
        raise DataError(where, f"image too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise DataError(
            where, f"not a readable image (no image format; it starts {_first_bytes(where)})"
        ) from e
    except OSError as e:
        raise DataError(where, f"not a readable image ({type(e).__name__}: {e})") from e
    with img:
        # The header gives the size before any pixel is decoded: refuse bombs before they cost memory.
        width, height = img.size
        if width * height > max_pixels:
            raise DataError(where, f"image is {width}x{height}, over the {max_pixels:,}-pixel limit")
        try:
            # Every pixel decoded: a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES is left False).
            img.load()
            return to_rgb(img)
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
            raise DataError(where, f"image data is corrupt ({type(e).__name__}: {e})") from e


def image_problem(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> str | None:
    """What makes `path` unusable for training (missing, empty, not an image, truncated, corrupt, over
    `max_pixels`), or None when `load_image` reads it."""
    try:
        load_image(path, max_pixels)
    except DataError as err:
        return err.problem
    return None


def _first_bytes(path: str, n: int = 16) -> str:
    # What the file holds instead (an HTML page, a text error) says more than PIL's "cannot identify".
    with open(path, "rb") as f:
        return repr(f.read(n))


def bad_image_problem(bad: list[tuple[str, str]]) -> str:
    """The problem reported for a record whose images `bad` ((path as in the record, its problem), in order) are
    unusable: the first named, the others counted."""
    name, problem = bad[0]
    more = f" (and {len(bad) - 1} more of its images)" if len(bad) > 1 else ""
    return f"image {name}: {problem}{more}"


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's padding: centre the image on a square canvas of its longer side."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass
class ImageProcessor:
    image_size: int
    """Side of the square model input, in pixels."""
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    """Per-channel mean on the 0-1 scale; also the padding colour (as int(x * 255), like LLaVA)."""
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    """Per-channel standard deviation on the 0-1 scale."""
    aspect: Aspect = "pad"
    """"pad": pad to square with the mean colour, then resize (LLaVA-1.5); "crop": resize the shorter
    side and center crop (CLIP's own); "resize": squash to a square, ignoring the aspect ratio."""

    def __post_init__(self) -> None:
        if self.aspect not in ("pad", "resize", "crop"):
            raise ValueError(f"image aspect must be 'pad', 'resize' or 'crop', got {self.aspect!r}")
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {self.mean} and {self.std}")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(x * 255) for x in self.mean)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> normalised float32 tensor [3, image_size, image_size]."""
        return normalized(self.resized(img), self.mean, self.std)

    def resized(self, img: Image.Image) -> Image.Image:
        """The RGB image_size square the model sees, before normalisation. Processing it again gives the same
        tensor (each step leaves such an image as it is), so it can stand in for a large image kept for later."""
        img = to_rgb(img)
        size = self.image_size
        if self.aspect == "resize":
            return img.resize((size, size), Image.Resampling.BICUBIC)
        if self.aspect == "pad":
            img = expand2square(img, self.pad_color)
        return _center_crop(_resize_shortest(img, size), size)


def normalized(
    img: Image.Image, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """An RGB PIL image -> float32 tensor [3, H, W] on the 0-1 scale, normalised by `mean` and `std`."""
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels.float() / 255 - mean_t) / std_t


def _resize_shortest(img: Image.Image, size: int) -> Image.Image:
    # Same output size arithmetic as torchvision's Resize(int), which open_clip uses (long side truncated).
    width, height = img.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    # torchvision's CenterCrop offsets: round half to even of the margin / 2.
    width, height = img.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return img.crop((left, top, left + size, top + size))
