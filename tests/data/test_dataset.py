"""build_dataset / SFTDataset: what training reads, from the Arrow tables; packing keeps every sample and label."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from llava_ft.config import DataSection, DataSource
from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data import dataset as dataset_module
from llava_ft.data.anyres import AnyresGeometry
from llava_ft.data.collate import PackedCollator
from llava_ft.data.conversation import DataError
from llava_ft.data.dataset import build_dataset
from llava_ft.data.faults import IMAGE_FAULTS, ImageFault
from llava_ft.data.packing import PackedDataset
from llava_ft.data.sources import read_conversations
from llava_ft.data.templates import get_template
from llava_ft.data.tokenize import Encoder, encode_all

N_IMG = 6


def processor(image: Image.Image) -> torch.Tensor:
    """Stands in for the vision tower's processor: the image's mean colour, so each image is recognisable."""
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1).expand(3, 2, 2)


@pytest.fixture
def sources(tmp_path) -> list[DataSource]:
    images = tmp_path / "images"
    images.mkdir()
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (4, 4), colour).save(images / f"{k}.png")
    llava = [
        {"id": "a", "image": "0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "b", "image": ["1.png", "2.png"], "conversations": [
            {"from": "human", "value": "<image> vs <image>: which is blue?"}, {"from": "gpt", "value": "The second."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "No image."}, {"from": "gpt", "value": "Fine."}]},
    ]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    text = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(i))}]} for i in range(1, 30)]  # fmt: skip
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in text) + "\n")
    return [
        DataSource(str(tmp_path / "llava.json"), image_folder=str(images)),
        DataSource(str(tmp_path / "sft.jsonl")),
    ]


def section(sources, tmp_path, **kw) -> DataSection:
    data = DataSection(train=sources, template="internlm2_chat", max_length=64, **kw)
    data.cache_dir = str(tmp_path / "cache")  # proposed DataSection field
    return data


def reference(sources, tok):
    """Each file through Encoder.encode, one record at a time (the per-sample reference path)."""
    enc = Encoder(tok, get_template("internlm2_chat", tok), max_length=64, image_tokens=N_IMG)
    out = []
    for src in sources:
        convs, _ = read_conversations(src.path)
        out += encode_all(convs, enc)[0]
    return out


def test_reads_arrow_and_matches_reference(sources, tokenizers, tmp_path):
    tok = tokenizers["llama"]
    ds, stats = build_dataset(section(sources, tmp_path), tok, get_template("internlm2_chat", tok),
                              image_tokens=N_IMG, image_processor=processor)  # fmt: skip
    want = reference(sources, tok)
    assert len(ds) == len(want) == stats.kept and stats.truncated > 0  # long counts are truncated at 64
    assert all(isinstance(t, datasets.Dataset) for t in ds.tables)  # rows stay in the (mapped) Arrow tables
    for i, sample in enumerate(want):
        item = ds[i]
        assert item["input_ids"].tolist() == sample.input_ids and item["labels"].tolist() == sample.labels
        assert ds.lengths[i] == len(sample.input_ids) and item["input_ids"].dtype == torch.long
    # Images come from the source's image folder, in marker order.
    assert ds[0]["pixel_values"][:, 0, 0, 0].tolist() == [255.0]
    assert ds[1]["pixel_values"][:, :, 0, 0].tolist() == [[0, 255, 0], [0, 0, 255]]
    assert "pixel_values" not in ds[2] and "pixel_values" not in ds[3]
    assert (ds[1]["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 2 * N_IMG


def test_second_build_uses_the_cache(sources, tokenizers, tmp_path, caplog):
    tok = tokenizers["llama"]
    template = get_template("internlm2_chat", tok)
    build_dataset(section(sources, tmp_path), tok, template, image_tokens=N_IMG)
    with caplog.at_level("INFO", logger="llava_ft"):
        ds, _ = build_dataset(section(sources, tmp_path), tok, template, image_tokens=N_IMG)
    assert caplog.text.count("(hit,") == 2 and len(ds) == 32


def test_missing_processor_and_unreadable_image_name_the_record(sources, tokenizers, tmp_path):
    tok = tokenizers["llama"]
    template = get_template("internlm2_chat", tok)
    ds, _ = build_dataset(section(sources, tmp_path), tok, template, image_tokens=N_IMG)
    with pytest.raises(
        DataError, match=r"llava\.json\[0\]: sample has images but the model has no vision tower"
    ):
        ds[0]
    ds, _ = build_dataset(
        section(sources, tmp_path), tok, template, image_tokens=N_IMG, image_processor=processor
    )
    # Gone (or damaged) after the build: the sample that draws it names the record, not only the image.
    (Path(sources[0].image_folder) / "2.png").unlink()
    with pytest.raises(DataError, match=r"llava\.json\[1\]: image \S*images/2\.png: image file not found"):
        ds[1]
    (Path(sources[0].image_folder) / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"llava\.json\[1\]: image \S*2\.png: not a readable image"):
        ds[1]


def test_missing_image_stops_the_build_even_from_the_cache(sources, tokenizers, tmp_path, caplog):
    tok = tokenizers["llama"]
    template = get_template("internlm2_chat", tok)
    build_dataset(section(sources, tmp_path), tok, template, image_tokens=N_IMG)  # cached with every image
    folder = Path(sources[0].image_folder)
    (folder / "2.png").unlink()
    with caplog.at_level("INFO", logger="llava_ft"), pytest.raises(DataError) as err:
        build_dataset(section(sources, tmp_path), tok, template, image_tokens=N_IMG)
    assert str(err.value) == (
        f"{sources[0].path}[1]: image 2.png: file not found in {folder} (data.skip_bad skips them)"
    )
    assert "prepared-data cache" not in caplog.text  # the entry was loaded, not rebuilt


def test_skip_bad_leaves_out_records_with_missing_images(sources, tokenizers, tmp_path):
    tok = tokenizers["llama"]
    template = get_template("internlm2_chat", tok)
    full, full_stats = build_dataset(section(sources, tmp_path, skip_bad=True), tok, template,
                                     image_tokens=N_IMG, image_processor=processor)  # fmt: skip
    want = [full.tokens(i) for i in range(len(full)) if i != 1]
    (Path(sources[0].image_folder) / "2.png").unlink()
    for _ in range(2):  # built, then from the cache
        ds, stats = build_dataset(section(sources, tmp_path, skip_bad=True), tok, template,
                                  image_tokens=N_IMG, image_processor=processor)  # fmt: skip
        assert len(ds) == len(full) - 1 == stats.kept and stats.records == full_stats.records == 32
        assert stats.skipped == 1 and stats.problems == [
            (f"{sources[0].path}[1]", f"image 2.png: file not found in {sources[0].image_folder}")
        ]
        assert "skipped 1" in stats.summary() and stats.as_dict()["skipped"] == 1
        for i, (ids, labels) in enumerate(want):  # sample 1 ("b") is gone; the rest are unchanged
            got = ds.tokens(i)
            assert got[0].tolist() == ids.tolist() and got[1].tolist() == labels.tolist()
            assert ds.lengths[i] == len(ids)
        assert "pixel_values" not in ds[1]  # "c", the text-only record, follows "a"
        removed = full.lengths[1]
        assert stats.total_tokens == full_stats.total_tokens - removed
        assert stats.image_tokens == full_stats.image_tokens - 2 * N_IMG
        assert stats.supervised_tokens == full_stats.supervised_tokens - int(
            (full.tokens(1)[1] != IGNORE_INDEX).sum()
        )


def test_records_skipped_at_reading_are_in_the_totals(tokenizers, tmp_path, caplog):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    lines = [json.dumps(good)] * 4 + [
        json.dumps({"conversations": [{"from": "robot", "value": "x"}]}),
        "{broken json",
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    data = DataSection(train=[DataSource(str(tmp_path / "d.jsonl"))], template="internlm2_chat", max_length=64,
                       skip_bad=True, cache=False)  # fmt: skip
    tok = tokenizers["llama"]
    with caplog.at_level("INFO", logger="llava_ft"):
        ds, stats = build_dataset(data, tok, get_template("internlm2_chat", tok), image_tokens=N_IMG)
    d = stats.as_dict()  # what training writes to summary.json["data"]
    assert len(ds) == d["kept"] == 4 and d["records"] == 6 and d["skipped"] == 2 and d["num_problems"] == 2
    assert [where for where, _ in d["problems"]] == [f"{tmp_path / 'd.jsonl'}:5", f"{tmp_path / 'd.jsonl'}:6"]
    assert "records 6: kept 4" in caplog.text and "skipped 2" in caplog.text


def test_packing_keeps_every_sample_and_label(sources, tokenizers, tmp_path):
    tok = tokenizers["llama"]
    ds, _ = build_dataset(section(sources, tmp_path), tok, get_template("internlm2_chat", tok),
                          image_tokens=N_IMG, image_processor=processor)  # fmt: skip
    packed = PackedDataset(ds, ds.lengths, 64, seed=3)
    collate = PackedCollator(pad_token_id=0, row_length=64)
    seen = []
    for r in range(len(packed)):
        batch = collate([packed[r]])
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        for j, index in enumerate(packed.rows[r]):
            sample = ds[index]
            a, n = starts[j], len(sample["input_ids"])
            assert batch["input_ids"][0, a : a + n].tolist() == sample["input_ids"].tolist()  # not split
            # Every label kept, except the first of each sample (never a target: nothing precedes it).
            assert batch["labels"][0, a] == IGNORE_INDEX
            assert batch["labels"][0, a + 1 : a + n].tolist() == sample["labels"][1:].tolist()
            seen.append(index)
        assert (batch["labels"][0, sum(ds.lengths[i] for i in packed.rows[r]) :] == IGNORE_INDEX).all()
    assert sorted(seen) == list(range(len(ds)))  # every sample exactly once
    assert packed.stats().real_tokens == sum(ds.lengths)


def test_plain_text_data_needs_no_chat_template_markers(tmp_path):
    """Incremental pretraining never renders the chat template: the default internlm2_chat must not refuse a
    Llama tokenizer without ChatML tokens there; chat data still gets the check."""
    import shutil

    import mistral_common
    from transformers import LlamaTokenizer

    from llava_ft.data.dataset import data_encoder

    shutil.copy(
        Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tmp_path / "tokenizer.model"
    )
    tok = LlamaTokenizer.from_pretrained(tmp_path)
    text = tmp_path / "corpus.jsonl"
    text.write_text(json.dumps({"text": "The cat sat."}) + "\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
        + "\n"
    )
    data = DataSection(train=[DataSource(str(text))], template="internlm2_chat", cache=False)
    ds, stats = build_dataset(data, tok, get_template(data.template, tok), image_tokens=0)
    assert stats.kept == 1 and ds[0]["input_ids"][0].item() == tok.bos_token_id
    data.train.append(DataSource(str(chat)))
    with pytest.raises(
        ValueError, match="'<\\|im_start\\|>' as .* tokens .* 'internlm2_chat' template needs it"
    ):
        data_encoder(data, tok, get_template(data.template, tok), 0)


@pytest.fixture
def twins(tmp_path) -> DataSource:
    """Two image records of one length with a text record between them (a nearer sample of another length)."""
    images = tmp_path / "twins"
    images.mkdir()
    for k, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (4, 4), colour).save(images / f"{k}.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    records = [
        {"id": "a", "image": "0.png", "conversations": turns},
        {
            "id": "t",
            "conversations": [{"from": "human", "value": "No image."}, {"from": "gpt", "value": "Fine."}],
        },
        {"id": "b", "image": "1.png", "conversations": turns},
    ]
    (tmp_path / "twins.json").write_text(json.dumps(records))
    return DataSource(str(tmp_path / "twins.json"), image_folder=str(images))


def test_skip_bad_replaces_a_sample_whose_image_fails_by_the_next_that_loads(twins, tokenizers, tmp_path):
    """A function of the index alone: the next sample whose images load, one of the same length first."""
    tok = tokenizers["llama"]
    data = section([twins], tmp_path, skip_bad=True)
    ds, _ = build_dataset(data, tok, get_template("internlm2_chat", tok), image_tokens=N_IMG,
                          image_processor=processor)  # fmt: skip
    assert ds.lengths[0] == ds.lengths[2] != ds.lengths[1]
    folder = Path(twins.image_folder)
    (folder / "0.png").write_bytes(b"")  # emptied after the data was checked
    item = ds[0]
    assert item["pixel_values"][:, :, 0, 0].tolist() == [[0, 0, 255]]  # record b, not the nearer text one
    [fault] = item[IMAGE_FAULTS]
    assert fault["record"].endswith("twins.json[0]") and fault["replaced_by"].endswith("twins.json[2]")
    assert fault["image"] == str(folder / "0.png") and fault["problem"].startswith("not a readable image")
    again = ds[0]
    assert torch.equal(again["input_ids"], item["input_ids"]) and again[IMAGE_FAULTS] == item[IMAGE_FAULTS]
    assert IMAGE_FAULTS not in ds[1] and IMAGE_FAULTS not in ds[2]

    (folder / "1.png").unlink()  # no sample of that length loads: the next of any length
    item = ds[0]
    assert "pixel_values" not in item and item[IMAGE_FAULTS][0]["replaced_by"].endswith("twins.json[1]")
    assert item["input_ids"].tolist() == ds[1]["input_ids"].tolist()


def test_skip_bad_stops_when_the_samples_tried_in_a_failed_ones_place_fail_too(
    twins, tokenizers, tmp_path, monkeypatch
):
    tok = tokenizers["llama"]
    ds, _ = build_dataset(section([twins], tmp_path, skip_bad=True), tok, get_template("internlm2_chat", tok),
                          image_tokens=N_IMG, image_processor=processor)  # fmt: skip
    monkeypatch.setattr(dataset_module, "REPLACEMENT_TRIES", 1)
    for name in ("0.png", "1.png"):
        (Path(twins.image_folder) / name).write_bytes(b"<html>")
    with pytest.raises(
        ImageFault,
        match=r"twins\.json\[0\]: image \S+0\.png: not a readable image .*; no replacement: the 1 ",
    ):
        ds[0]


def test_without_skip_bad_a_failed_image_raises_an_image_fault(twins, tokenizers, tmp_path):
    tok = tokenizers["llama"]
    ds, _ = build_dataset(section([twins], tmp_path), tok, get_template("internlm2_chat", tok),
                          image_tokens=N_IMG, image_processor=processor)  # fmt: skip
    (Path(twins.image_folder) / "0.png").write_bytes(b"")
    with pytest.raises(ImageFault) as err:
        ds[0]
    assert err.value.where.endswith("twins.json[0]") and err.value.image.endswith("0.png")


# ---------------------------------------------------------------- any-resolution: counts per image from its size

GEOMETRY = AnyresGeometry.build(32, 4)  # a 32-px tower of 8-px patches, LLaVA-NeXT's five canvases
# (height, width) of each image: wide, tall, square-ish and tiny, so that the counts differ.
ANYRES_SIZES = {"w.png": (30, 90), "t.png": (120, 40), "s.png": (70, 64), "x.png": (9, 11)}


class AnyresStandIn:
    """Stands in for the any-resolution processor: one [3, 2, 2] view per tower input (base view, then tiles),
    each filled with the image's width so that the views can be traced back to their image."""

    anyres = True
    geometry = GEOMETRY

    def __call__(self, image: Image.Image) -> torch.Tensor:
        views = GEOMETRY.num_views(image.height, image.width)
        return torch.full((views, 3, 2, 2), float(image.width))


@pytest.fixture
def anyres_source(tmp_path) -> DataSource:
    images = tmp_path / "anyres"
    images.mkdir()
    for name, (height, width) in ANYRES_SIZES.items():
        Image.new("RGB", (width, height), (9, 9, 9)).save(images / name)
    q = {"from": "human", "value": "<image>\nWhat shape?"}
    a = {"from": "gpt", "value": "A shape of some size."}
    records = [
        {"id": "w", "image": "w.png", "conversations": [q, a]},
        {"id": "two", "image": ["t.png", "x.png"], "conversations": [
            {"from": "human", "value": "<image> then <image>: which is taller?"}, a]},
        {"id": "none", "conversations": [{"from": "human", "value": "No image."}, a]},
        {"id": "s", "image": "s.png", "conversations": [q, a]},
    ]  # fmt: skip
    (tmp_path / "anyres.json").write_text(json.dumps(records))
    return DataSource(str(tmp_path / "anyres.json"), image_folder=str(images))


def anyres_counts(*names: str) -> list[int]:
    return [GEOMETRY.num_tokens(*ANYRES_SIZES[n]) for n in names]


def anyres_build(anyres_source, tokenizers, tmp_path, **kw):
    tok = tokenizers["llama"]
    data = section([anyres_source], tmp_path, **kw)
    data.max_length = 400
    return build_dataset(data, tok, get_template("internlm2_chat", tok), image_tokens=GEOMETRY,
                         image_processor=AnyresStandIn())  # fmt: skip


def image_runs(ids: torch.Tensor) -> list[int]:
    runs, n = [], 0
    for t in [*ids.tolist(), None]:
        if t == IMAGE_TOKEN_INDEX:
            n += 1
        elif n:
            runs, n = [*runs, n], 0
    return runs


def test_anyres_items_expand_by_the_stored_counts_and_carry_image_sizes(anyres_source, tokenizers, tmp_path):
    ds, stats = anyres_build(anyres_source, tokenizers, tmp_path)
    per_sample = [anyres_counts("w.png"), anyres_counts("t.png", "x.png"), [], anyres_counts("s.png")]
    assert len(set(sum(per_sample, []))) == 4  # every image its own count
    assert ds.image_token_totals() == [sum(c) for c in per_sample]
    for i, counts in enumerate(per_sample):
        item = ds[i]
        assert image_runs(item["input_ids"]) == counts and len(item["input_ids"]) == ds.lengths[i]
        if not counts:
            assert "pixel_values" not in item and "image_sizes" not in item
            continue
        names = [["w.png"], ["t.png", "x.png"], [], ["s.png"]][i]
        sizes = [ANYRES_SIZES[n] for n in names]
        assert (
            item["image_sizes"].tolist() == [list(s) for s in sizes]
            and item["image_sizes"].dtype == torch.long
        )
        # Every view of every image, in image order.
        widths = [w for h, w in sizes for _ in range(GEOMETRY.num_views(h, w))]
        assert item["pixel_values"][:, 0, 0, 0].tolist() == widths
    assert stats.image_tokens == sum(map(sum, per_sample))
    assert sorted(stats.tokens_per_sample.elements()) == sorted(sum(c) for c in per_sample if c)


def test_anyres_lengths_drive_packing_and_the_sampler(anyres_source, tokenizers, tmp_path):
    from llava_ft.data.sampler import LengthGroupedSampler

    ds, _ = anyres_build(anyres_source, tokenizers, tmp_path)
    assert ds.lengths == [len(ds.tokens(i)[0]) for i in range(len(ds))]
    row = max(ds.lengths)
    packed = PackedDataset(ds, ds.lengths, row, seed=0)
    for r in range(len(packed)):  # planned from the lengths; a sample of another length would raise
        assert (
            sum(len(s["input_ids"]) for s in packed[r]) == sum(ds.lengths[j] for j in packed.rows[r]) <= row
        )
    assert sorted(j for r in packed.rows for j in r) == list(range(len(ds)))
    # The sampler's batch of one starts at the longest sample: the image tokens make it the longest.
    longest = max(range(len(ds)), key=ds.lengths.__getitem__)
    assert longest == 1 and next(iter(LengthGroupedSampler(ds.lengths, batch_size=1, mega_batch_mult=4))) == 1


def test_anyres_max_image_tokens_drops_with_a_count(anyres_source, tokenizers, tmp_path):
    limit = sum(anyres_counts("t.png", "x.png")) - 1  # the two-image sample is over it, the others are not
    assert max(anyres_counts("w.png"), anyres_counts("s.png"))[0] <= limit
    ds, stats = anyres_build(anyres_source, tokenizers, tmp_path, max_image_tokens=limit)
    assert len(ds) == stats.kept == 3 and stats.dropped == {"too many image tokens": 1}
    assert stats.problems[0][0].endswith("anyres.json[1]")
    assert "dropped (too many image tokens): 1" in stats.summary()


def test_anyres_image_resized_after_preparation_is_an_image_fault(anyres_source, tokenizers, tmp_path):
    ds, _ = anyres_build(anyres_source, tokenizers, tmp_path)
    Image.new("RGB", (300, 20)).save(
        Path(anyres_source.image_folder) / "w.png"
    )  # another size, another count
    with pytest.raises(
        ImageFault, match=r"anyres\.json\[0\]: image \S*w\.png: image is 300x20 now .* changed"
    ):
        ds[0]
    ds, _ = anyres_build(anyres_source, tokenizers, tmp_path, skip_bad=True)  # prepared again: the new size
    assert image_runs(ds[0]["input_ids"]) == [GEOMETRY.num_tokens(20, 300)]
