"""ImageProcessor against open_clip's eval transform and transformers' LlavaImageProcessor (PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.models.llava import LlavaImageProcessorPil

from llava_ft.data.conversation import DataError
from llava_ft.data.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TRANSPARENT_BACKGROUND,
    ImageProcessor,
    load_image,
    to_rgb,
)

# Wide, tall, odd margins, square, smaller than the target (upscaled).
SHAPES = [(97, 40), (33, 80), (64, 63), (50, 50), (20, 13)]
SIZE = 32


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def naive_pad(img: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """LLaVA-1.5's expand2square written with numpy."""
    pixels = np.asarray(img)
    height, width, _ = pixels.shape
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = [int(m * 255) for m in mean]
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = pixels
    return Image.fromarray(canvas)


@pytest.mark.parametrize("shape", SHAPES)
def test_pad_equals_open_clip_transform_on_padded_image(shape):
    img = noise_image(*shape)
    ours = ImageProcessor(SIZE, aspect="pad")(img)
    reference = image_transform(SIZE, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)(
        naive_pad(img, OPENAI_CLIP_MEAN)
    )
    assert ours.shape == (3, SIZE, SIZE) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_pad_equals_llava_image_processor_pil(shape):
    img = noise_image(*shape, seed=1)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # non-default, so a hard-wired mean/std would show
    hf = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=list(mean),
        image_std=list(std),
    )
    reference = hf(images=img, return_tensors="pt")["pixel_values"][0]
    ours = ImageProcessor(SIZE, mean, std, aspect="pad")(img)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("aspect", "resize_mode"), [("crop", "shortest"), ("resize", "squash")])
def test_crop_and_resize_equal_open_clip(shape, aspect, resize_mode):
    img = noise_image(*shape, seed=2)
    reference = image_transform(
        SIZE, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize_mode=resize_mode
    )(img)
    torch.testing.assert_close(ImageProcessor(SIZE, aspect=aspect)(img), reference, atol=1e-6, rtol=0)


def test_pad_colour_is_llava_mean_colour():
    # A 1-pixel-high strip: almost the whole padded canvas is the pad colour, which LLaVA-1.5 sets to
    # (122, 116, 104) for the OpenAI CLIP mean; after normalisation it is int(m*255)/255 - m over std.
    out = ImageProcessor(SIZE)(noise_image(SIZE, 1))
    expected = [(c / 255 - m) / s for c, m, s in zip((122, 116, 104), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_images_are_converted(mode):
    img = noise_image(40, 30).convert(mode)
    processor = ImageProcessor(SIZE)
    torch.testing.assert_close(processor(img), processor(img.convert("RGB")))


def test_bad_aspect_is_rejected():
    with pytest.raises(ValueError, match="aspect"):
        ImageProcessor(SIZE, aspect="squash")


def test_load_image_returns_rgb(tmp_path):
    path = tmp_path / "grey.png"
    noise_image(12, 10).convert("L").save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (12, 10)


def test_load_image_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(DataError, match="not found") as err:
        load_image(path)
    assert err.value.where == str(path)


def test_load_image_not_an_image_names_the_path(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a jpeg")
    with pytest.raises(DataError, match="not a readable image") as err:
        load_image(path)
    assert err.value.where == str(path)


def test_load_image_truncated_names_the_path(tmp_path):
    path = tmp_path / "cut.png"
    noise_image(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(DataError, match="corrupt") as err:
        load_image(path)
    assert err.value.where == str(path)


def test_load_image_refuses_oversized_images(tmp_path):
    path = tmp_path / "big.png"
    noise_image(100, 60).save(path)
    with pytest.raises(DataError, match="100x60, over the 5,000-pixel limit") as err:
        load_image(path, max_pixels=5000)
    assert err.value.where == str(path)
    assert load_image(path, max_pixels=6000).size == (100, 60)


def _pixel(img, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(np.asarray(img)[xy[1], xy[0]].tolist())


def test_sixteen_bit_grey_scales_to_eight_bits(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey to 255 (a mid-grey scan turns white); the top byte is kept, rounded:
    v * 255 / 65535, worked out by hand below."""
    values = np.array([[0, 4000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert [_pixel(img, (x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (16, 16, 16),
        (128, 128, 128),
        (255, 255, 255),
    ]
    # 32-bit "I" holding 16-bit data (how some 16-bit files open), and 8-bit values in "I" left as they are.
    assert _pixel(to_rgb(Image.fromarray(values.astype(np.int32), "I")), (1, 0)) == (16, 16, 16)
    assert _pixel(to_rgb(Image.fromarray(np.array([[7, 200]], dtype=np.int32), "I")), (1, 0)) == (
        200,
        200,
        200,
    )


def test_float_images_read_as_zero_to_one_or_as_bytes():
    assert _pixel(to_rgb(Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32), "F"))) == (128, 128, 128)
    assert _pixel(to_rgb(Image.fromarray(np.array([[90.0, 300.0]], dtype=np.float32), "F")), (1, 0)) == (
        255,
        255,
        255,
    )


def test_transparency_is_composited_on_white(tmp_path):
    """A transparent pixel becomes white, a half-transparent one the blend a * src + (1 - a) * white, as
    transformers' convert_to_rgb (an exported model's processor) does; convert("RGB") would show the hidden colour."""
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # invisible red
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    rgba.putpixel((2, 0), (10, 20, 30, 255))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    img = load_image(path)
    white = TRANSPARENT_BACKGROUND
    assert white == (255, 255, 255) and _pixel(img, (0, 0)) == white
    a = 128 / 255
    blend = [a * s + (1 - a) * b for s, b in zip((0, 0, 255), white)]
    assert all(abs(got - want) <= 1 for got, want in zip(_pixel(img, (1, 0)), blend))
    assert _pixel(img, (2, 0)) == (10, 20, 30)
    # Grey with alpha, and a palette with a transparent index, the same way.
    assert _pixel(to_rgb(Image.new("LA", (1, 1), (200, 0)))) == white
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert [_pixel(to_rgb(palette), (x, 0)) for x in range(2)] == [white, (0, 0, 255)]
    # The independent reference: transformers' own conversion, on each of these.
    for image in (rgba, Image.new("LA", (1, 1), (200, 90)), palette):
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), convert_to_rgb(image, return_numpy=True))
    # An in-memory image reaches the tower the same way (chat and serve hand PIL images to the processor).
    processor = ImageProcessor(SIZE)
    torch.testing.assert_close(processor(rgba), processor(to_rgb(rgba)))


def test_other_modes_convert_as_pil_does():
    assert _pixel(to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))) == (255, 255, 255)
    assert _pixel(to_rgb(Image.new("1", (1, 1), 1))) == (255, 255, 255)
    assert _pixel(to_rgb(Image.new("L", (1, 1), 77))) == (77, 77, 77)
