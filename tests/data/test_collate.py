"""Collators: padding, masks, images, and packed rows against transformers' DataCollatorWithFlattening."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from llava_ft.constants import IGNORE_INDEX as X
from llava_ft.constants import IMAGE_TOKEN_INDEX as IMG
from llava_ft.data.collate import Collator, PackedCollator
from llava_ft.data.conversation import DataError
from llava_ft.data.faults import IMAGE_FAULTS

PAD = 0


def image(value: float, n: int = 1) -> torch.Tensor:
    """n images whose pixels all equal `value`, so their order in a batch is visible."""
    return torch.full((n, 3, 4, 4), value)


def test_collator_pads_right_and_masks() -> None:
    items = [
        {"input_ids": [5, 6, 7], "labels": [X, 6, 7]},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
        {"input_ids": [9, 10], "labels": [X, X], "pixel_values": None},
    ]
    batch = Collator(pad_token_id=PAD)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD], [9, 10, PAD]]
    assert batch["labels"].tolist() == [[X, 6, 7], [8, X, X], [X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert "pixel_values" not in batch
    assert batch["image_counts"].tolist() == [0, 0, 0]


def test_collator_pad_to_multiple_of() -> None:
    batch = Collator(pad_token_id=PAD, pad_to_multiple_of=4)([{"input_ids": [1] * 5, "labels": [1] * 5}])
    assert batch["input_ids"].tolist() == [[1, 1, 1, 1, 1, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


def test_collator_mixes_text_and_image_items_in_order() -> None:
    items = [
        {"input_ids": [1, IMG, IMG, 2], "labels": [X, X, X, 2], "pixel_values": image(1.0)},
        {"input_ids": [3, 4], "labels": [X, 4]},
        {"input_ids": [IMG, IMG, 5, IMG, IMG], "labels": [X, X, X, X, X], "pixel_values": image(2.0, n=2)},
        {"input_ids": [6], "labels": [6], "pixel_values": torch.zeros(0, 3, 4, 4)},
    ]
    batch = Collator(pad_token_id=PAD)(items)
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]
    assert batch["image_counts"].tolist() == [1, 0, 2, 0]
    assert batch["input_ids"][2].tolist() == [IMG, IMG, 5, IMG, IMG]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"input_ids": [1, 2], "labels": [1]}, "batch item 1: 2 input_ids but 1 labels"),
        ({"input_ids": [1, IMG], "labels": [1, X]}, "batch item 1: has image tokens but no pixel_values"),
        ({"input_ids": [1], "labels": [1], "pixel_values": image(0.0)}, "pixel_values but no image tokens"),
        ({"input_ids": [1] * 9, "labels": [1] * 9}, "batch item 1: 9 tokens exceed max_length=8"),
    ],
)
def test_collator_rejects_bad_items(item: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Collator(pad_token_id=PAD, max_length=8)([{"input_ids": [1], "labels": [1]}, item])


def test_collator_rejects_images_of_different_shapes() -> None:
    items = [
        {"input_ids": [IMG], "labels": [X], "pixel_values": image(0.0)},
        {"input_ids": [IMG], "labels": [X], "pixel_values": torch.zeros(1, 3, 8, 8)},
    ]
    with pytest.raises(DataError, match="images of different shapes"):
        Collator(pad_token_id=PAD)(items)


def test_packed_row_equals_transformers_flattening() -> None:
    samples = [
        {"input_ids": [11, 12, 13, 14], "labels": [X, X, 13, 14]},
        {"input_ids": [21], "labels": [21]},
        {"input_ids": [31, 32, 33], "labels": [31, 32, 33]},
    ]
    ours = PackedCollator(pad_token_id=PAD, row_length=16)([samples])
    reference = DataCollatorWithFlattening(return_tensors="pt")(samples)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(ours[key], reference[key]), key
    assert "attention_mask" not in ours


def test_packed_rows_pad_with_their_own_segment_and_count_images_per_row() -> None:
    rows = [
        [
            {"input_ids": [1, IMG, 2], "labels": [X, X, 2], "pixel_values": image(1.0)},
            {"input_ids": [3, 4], "labels": [3, 4]},
        ],
        [
            {"input_ids": [5], "labels": [5]},
            {"input_ids": [IMG, IMG], "labels": [X, X], "pixel_values": image(2.0, n=2)},
            {"input_ids": [6, IMG], "labels": [6, X], "pixel_values": image(3.0)},
            {"input_ids": [7, 8, 9], "labels": [7, 8, 9]},
        ],
    ]
    batch = PackedCollator(pad_token_id=PAD, row_length=8, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].tolist() == [
        [1, IMG, 2, 3, 4, PAD, PAD, PAD],
        [5, IMG, IMG, 6, IMG, 7, 8, 9],
    ]
    assert batch["labels"].tolist() == [[X, X, 2, X, 4, X, X, X], [X, X, X, X, X, X, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 0, 1, 0, 1, 2]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0, 3.0]
    assert batch["image_counts"].tolist() == [1, 3]

    fixed = PackedCollator(pad_token_id=PAD, row_length=10, fixed_length=True)(rows[:1])
    assert fixed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]


def test_packed_row_longer_than_row_length_is_an_error() -> None:
    row = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    with pytest.raises(DataError, match="batch row 0: 5 tokens exceed row_length=4"):
        PackedCollator(pad_token_id=PAD, row_length=4)([row])
    with pytest.raises(DataError, match="batch row 0 sample 1: has image tokens"):
        PackedCollator(pad_token_id=PAD, row_length=8)([[row[0], {"input_ids": [IMG], "labels": [X]}]])


def fault(record: str) -> dict:
    return {
        "record": record,
        "image": f"/data/{record}.png",
        "problem": "not a readable image",
        "replaced_by": "z",
    }


def test_both_collators_carry_the_replacements_named_by_their_items() -> None:
    """Dataloader workers are other processes: the batch is how the trainer learns what was replaced."""
    items = [
        {"input_ids": [1, 2], "labels": [1, 2], IMAGE_FAULTS: [fault("a")]},
        {"input_ids": [3], "labels": [3]},
        {"input_ids": [4], "labels": [4], IMAGE_FAULTS: [fault("b")]},
    ]
    assert Collator(pad_token_id=PAD)(items)[IMAGE_FAULTS] == [fault("a"), fault("b")]
    packed = PackedCollator(pad_token_id=PAD, row_length=4)([items[:2], items[2:]])
    assert packed[IMAGE_FAULTS] == [fault("a"), fault("b")]
    assert IMAGE_FAULTS not in Collator(pad_token_id=PAD)(items[1:2])  # absent when nothing was replaced
    assert IMAGE_FAULTS not in PackedCollator(pad_token_id=PAD, row_length=4)([items[1:2]])


def anyres(values: list[float], sizes: list[tuple[int, int]], views: list[int]) -> dict:
    """pixel_values and image_sizes of any-resolution images: image k has views[k] views of value values[k]."""
    pixels = torch.cat([image(v, n) for v, n in zip(values, views)])
    return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


def test_both_collators_carry_image_sizes_and_count_images_not_views() -> None:
    items = [
        {"input_ids": [1, IMG, IMG], "labels": [X, X, X], **anyres([1.0], [(30, 10)], [3])},
        {"input_ids": [2], "labels": [2]},
        {"input_ids": [IMG, 3, IMG], "labels": [X, 3, X], **anyres([2.0, 3.0], [(5, 9), (40, 40)], [2, 4])},
    ]
    batch = Collator(pad_token_id=PAD)(items)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0] * 3 + [2.0] * 2 + [3.0] * 4
    assert batch["image_sizes"].tolist() == [[30, 10], [5, 9], [40, 40]]
    assert batch["image_sizes"].dtype == torch.long
    assert batch["image_counts"].tolist() == [1, 0, 2]
    packed = PackedCollator(pad_token_id=PAD, row_length=8)([[items[2], items[1]], [items[0]]])
    assert packed["pixel_values"][:, 0, 0, 0].tolist() == [2.0] * 2 + [3.0] * 4 + [1.0] * 3
    assert packed["image_sizes"].tolist() == [[5, 9], [40, 40], [30, 10]]
    assert packed["image_counts"].tolist() == [2, 1]
    assert "image_sizes" not in Collator(pad_token_id=PAD)(items[1:2])
    # Fixed-size images carry no sizes, and cannot share a batch with any-resolution ones.
    fixed = {"input_ids": [IMG], "labels": [X], "pixel_values": image(4.0)}
    assert "image_sizes" not in Collator(pad_token_id=PAD)([fixed, items[1]])
    with pytest.raises(DataError, match="with and without image_sizes"):
        Collator(pad_token_id=PAD)([items[0], fixed])
    with pytest.raises(DataError, match="with and without image_sizes"):
        PackedCollator(pad_token_id=PAD, row_length=8)([[items[0]], [fixed]])
    bad = {**items[0], "image_sizes": torch.tensor([30, 10])}
    with pytest.raises(DataError, match=r"batch item 0: image_sizes must be \[n_img, 2\]"):
        Collator(pad_token_id=PAD)([bad])
