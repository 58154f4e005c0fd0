"""prepare.py: the batched path gives `Encoder.encode`'s ids and labels exactly; the cache; processes; the CLI."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from llava_ft.cli.data import main
from llava_ft.constants import IGNORE_INDEX
from llava_ft.data import prepare as prep
from llava_ft.data.anyres import AnyresGeometry
from llava_ft.data.conversation import DataError
from llava_ft.data.dataset import SFTDataset
from llava_ft.data.image_check import VERDICTS_DIR
from llava_ft.data.sources import read_conversations
from llava_ft.data.templates import get_template
from llava_ft.data.tokenize import Encoder, encode_all
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.files import temp_name
from llava_ft.testing.tiny_llm import write_internlm2_tokenizer

N_IMG = 7
PIECES = ["Hello", " world", "  two  spaces", "\n\nnew paragraph", "\ttab", "café", "中文字符", "🙂 ok", "x" * 40,
          " leading", "trailing ", "3.14159", "<|im_end|> in text", "don't", "\n", " "]  # fmt: skip


def text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(words)).strip() or "ok"


def corpus(seed: int = 0, n: int = 40) -> list[dict]:
    """LLaVA records exercising boundaries: whitespace at turn edges, unicode, several or no images, an
    opted-out turn, an all-opted-out record (dropped), long ones (truncated, or images past max_length)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        rounds = rng.randint(1, 3)
        turns = []
        for _ in range(rounds):
            q = rng.choice(["", " ", "\n"]) + text(rng, rng.randint(1, 6)) + rng.choice(["", " ", "\n"])
            a = rng.choice(["", " "]) + text(rng, rng.randint(1, 8)) + rng.choice(["", " ", "\n"])
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        record: dict = {"id": str(i), "conversations": turns}
        kind = i % 8
        if kind in (1, 2):
            record["image"] = f"img/{i}.png"
        elif kind == 3:
            record["image"] = [f"img/{i}a.png", f"img/{i}b.png"]
            turns[0]["value"] = "<image> and <image>\n" + turns[0]["value"]
        elif kind == 4:
            turns[1]["train"] = False
        elif kind == 5:
            turns[-1]["value"] += " " + text(rng, 120)  # long: truncated
        elif kind == 6 and i % 16 == 6:
            record["image"] = f"img/{i}.png"
            turns[0]["value"] = text(rng, 150) + " <image>"  # the image ends past max_length: dropped
        records.append(record)
    records[7]["conversations"] = [
        {"from": "human", "value": "q"},
        {"from": "gpt", "value": "a", "train": False},
    ]
    return records


def write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write(tmp_path / "d.json", corpus())


def encoder(tok, template="internlm2_chat", max_length=120, **kw) -> Encoder:
    return Encoder(tok, get_template(template, tok), max_length=max_length, image_tokens=N_IMG, **kw)


def comparable(stats) -> dict:
    # `realigned` counts samples whose segment-wise ids differ from the whole text's; the batched path only
    # sends records to Encoder that need it, so its count is not Encoder's. Everything else must be equal.
    d = stats.as_dict(max_problems=1000)
    d.pop("realigned")
    return d


@pytest.mark.parametrize("template", ["internlm2_chat", "llama2_chat", "llama3_chat", "vicuna_v1"])
def test_same_samples_as_encoder(template, family, tokenizers, data_file, tmp_path):
    tok = tokenizers[family]
    enc = encoder(tok, template)
    done = prep.prepare(data_file, enc, use_cache=False, skip_bad=True)
    convs, _ = read_conversations(data_file)
    samples, stats = encode_all(convs, enc, skip_bad=True)
    assert comparable(done.stats) == comparable(stats)
    assert stats.truncated and stats.dropped  # the corpus exercises both
    ds = SFTDataset([(done.dataset, tmp_path)])
    assert len(ds) == len(samples) == stats.kept
    for i, sample in enumerate(samples):
        ids, labels = ds.tokens(i)
        assert ids.tolist() == sample.input_ids and labels.tolist() == sample.labels, i
    assert ds.lengths == [len(s.input_ids) for s in samples]


def test_published_internlm2_layout_same_samples_as_encoder(data_file, tmp_path):
    """InternLM2's own tokenizer as published (placeholder marker pieces, tiktoken-style whitespace pieces)
    takes the chunked fast path through its twin and gives Encoder's samples (slow sentencepiece)."""
    folder = write_internlm2_tokenizer(
        tmp_path / "tok", add_dummy_prefix=False, piece_names="upstream", tiktoken_style=True
    )
    enc = encoder(load_tokenizer(folder))
    assert prep.BatchEncoder(enc).chunked is not None
    done = prep.prepare(data_file, enc, use_cache=False, skip_bad=True)
    samples, stats = encode_all(read_conversations(data_file)[0], enc, skip_bad=True)
    assert comparable(done.stats) == comparable(stats) and stats.truncated and stats.dropped
    ds = SFTDataset([(done.dataset, tmp_path)])
    assert [ds.tokens(i)[0].tolist() for i in range(len(ds))] == [s.input_ids for s in samples]
    assert [ds.tokens(i)[1].tolist() for i in range(len(ds))] == [s.labels for s in samples]


def test_truncation_around_the_last_image_as_encoder(family, tokenizers, tmp_path):
    """Records whose last image ends just before, at or just after max_length once each image counts
    N_IMG tokens: truncated or dropped exactly as `Encoder` does (counts, messages, ids and labels)."""
    records = [
        {"image": ["a.png", "b.png"],
         "conversations": [{"from": "human", "value": "w " * k + "<image> <image>\nq"},
                           {"from": "gpt", "value": "an answer of several words" + " more" * (k % 5)}]}
        for k in range(60, 120)
    ]  # fmt: skip
    path = write(tmp_path / "edge.json", records)
    enc = encoder(tokenizers[family], max_length=100)
    done = prep.prepare(path, enc, use_cache=False, skip_bad=True)
    samples, stats = encode_all(read_conversations(path)[0], enc, skip_bad=True)
    assert comparable(done.stats) == comparable(stats)
    assert stats.truncated and stats.dropped["images do not fit"]
    ds = SFTDataset([(done.dataset, tmp_path)])
    assert [ds.tokens(i)[0].tolist() for i in range(len(ds))] == [s.input_ids for s in samples]
    assert [ds.tokens(i)[1].tolist() for i in range(len(ds))] == [s.labels for s in samples]


def test_plain_text_same_samples_as_encoder(family, tokenizers, tmp_path):
    """Incremental pretraining records (BOS put first as an id, truncation, whitespace-led texts) through the
    batched path equal Encoder's."""
    tok = tokenizers[family]
    texts = ["The cat sat.", "  two leading spaces", "\nnewline first", "數學 and émigré " * 30, "x"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    enc = encoder(tok, max_length=40)
    done = prep.prepare(path, enc, use_cache=False)
    samples, stats = encode_all(read_conversations(path)[0], enc)
    assert comparable(done.stats) == comparable(stats) and stats.truncated == 1
    ds = SFTDataset([(done.dataset, tmp_path)])
    assert [ds.tokens(i)[0].tolist() for i in range(len(ds))] == [s.input_ids for s in samples]
    assert [ds.tokens(i)[1].tolist() for i in range(len(ds))] == [s.labels for s in samples]
    assert all(s.input_ids[0] == tok.bos_token_id and s.labels[0] == IGNORE_INDEX for s in samples)


def test_bad_record_names_file_and_record(tokenizers, tmp_path):
    records = corpus(n=12)
    records[9]["conversations"] = [{"from": "gpt", "value": "answer first"}]
    path = write(tmp_path / "bad.json", records)
    for num_proc in (1, 2):
        with pytest.raises(DataError, match=r"bad\.json\[9\]: .*role"):
            prep.prepare(path, encoder(tokenizers["bpe"]), use_cache=False, num_proc=num_proc)
    done = prep.prepare(path, encoder(tokenizers["bpe"]), use_cache=False, skip_bad=True)
    assert len(done.bad) == 1 and done.bad.items[0][0].endswith("bad.json[9]")  # counted at reading
    assert done.stats.records == 11


@pytest.mark.parametrize("fam", ["llama", "sp"])
def test_two_processes_same_output(fam, tokenizers, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_SIZE", 8)  # several batches in flight
    path = write(tmp_path / "d.json", corpus(n=60))
    enc = encoder(tokenizers[fam])
    one = prep.prepare(path, enc, use_cache=False, skip_bad=True)
    two = prep.prepare(path, enc, use_cache=False, skip_bad=True, num_proc=2)
    assert two.dataset.data.equals(one.dataset.data) and len(one.dataset) > 40
    assert two.stats.as_dict(1000) == one.stats.as_dict(1000)


def test_automatic_process_count(tokenizers, tmp_path, monkeypatch, caplog):
    """num_proc=None: 1 for a small file; else the allowed CPUs, capped, shared among local ranks unless this
    process prepares alone (the cache on: the other ranks wait for its entry); same output."""
    monkeypatch.setattr(prep, "BATCH_SIZE", 8)
    path = write(tmp_path / "d.json", corpus(n=40))
    assert prep.auto_num_proc(path) == 1  # far below 8 MiB
    monkeypatch.setattr(prep, "AUTO_NUM_PROC_MIN_BYTES", 0)
    monkeypatch.setattr(prep.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert prep.auto_num_proc(path) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert prep.auto_num_proc(path) == 3
    assert prep.auto_num_proc(path, alone=True) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")
    enc = encoder(tokenizers["bpe"])
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        auto = prep.prepare(path, enc, use_cache=False, num_proc=None)
    assert "with 2 process(es)" in caplog.text
    assert auto.dataset.data.equals(prep.prepare(path, enc, use_cache=False, num_proc=1).dataset.data)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        prep.prepare(path, enc, cache_dir=tmp_path / "cache", num_proc=None)
    assert "with 8 process(es)" in caplog.text


# ---------------------------------------------------------------- cache


def no_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the cache should have been used")

    monkeypatch.setattr(prep.BatchEncoder, "encode_batch", refuse)


def test_cache_hit_loads_without_tokenizing(tokenizers, data_file, tmp_path, monkeypatch):
    enc = encoder(tokenizers["bpe"])
    first = prep.prepare(data_file, enc, cache_dir=tmp_path / "c", skip_bad=True)
    no_tokenizing(monkeypatch)
    second = prep.prepare(data_file, enc, cache_dir=tmp_path / "c", skip_bad=True)
    assert (first.cache, second.cache) == ("built", "hit")
    assert second.dataset.data.equals(first.dataset.data)
    assert second.stats.as_dict(1000) == first.stats.as_dict(1000)
    with pytest.raises(AssertionError, match="tokenized"):  # --no-cache bypasses it
        prep.prepare(data_file, enc, cache_dir=tmp_path / "c", skip_bad=True, use_cache=False)


def test_every_key_part_invalidates(tokenizers, fresh_tokenizer, data_file, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    tok = tokenizers["bpe"]
    base = prep.prepare(data_file, encoder(tok), cache_dir=cache, skip_bad=True)
    changed_tok = fresh_tokenizer("bpe")
    changed_tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    variants = {
        "template": lambda: prep.prepare(data_file, encoder(tok, "qwen2_chat"), cache_dir=cache, skip_bad=True),
        "tokenizer": lambda: prep.prepare(data_file, encoder(tokenizers["llama"]), cache_dir=cache, skip_bad=True),
        "added token": lambda: prep.prepare(data_file, encoder(changed_tok), cache_dir=cache, skip_bad=True),
        "max_length": lambda: prep.prepare(data_file, encoder(tok, max_length=100), cache_dir=cache, skip_bad=True),
        "image tokens": lambda: prep.prepare(
            data_file, Encoder(tok, get_template("internlm2_chat", tok), max_length=120, image_tokens=3),
            cache_dir=cache, skip_bad=True),
        "last_turn_only": lambda: prep.prepare(
            data_file, encoder(tok, last_turn_only=True), cache_dir=cache, skip_bad=True),
        "max_image_tokens": lambda: prep.prepare(
            data_file, encoder(tok, max_image_tokens=N_IMG), cache_dir=cache, skip_bad=True),
    }  # fmt: skip
    for what, run in variants.items():
        assert run().cache == "built", what
    monkeypatch.setattr(prep, "code_version", lambda: "another version")
    assert prep.prepare(data_file, encoder(tok), cache_dir=cache, skip_bad=True).cache == "built"
    monkeypatch.undo()
    copy = tmp_path / "elsewhere" / data_file.name
    copy.parent.mkdir()
    copy.write_bytes(data_file.read_bytes())
    moved = prep.prepare(copy, encoder(tok), cache_dir=cache, skip_bad=True)
    problems = moved.bad.items + moved.stats.problems
    assert moved.cache == "built" and problems  # the copy's problems name the copy, not the original
    assert all(where.startswith(f"{copy}") for where, _ in problems)
    assert set(moved.dataset["source"]) and all(s.startswith(f"{copy}") for s in moved.dataset["source"])
    records = corpus()
    records[0]["conversations"][1]["value"] += " changed"
    write(data_file, records)  # same name, new content
    again = prep.prepare(data_file, encoder(tok), cache_dir=cache, skip_bad=True)
    assert again.cache == "built" and again.key != base.key


def test_damaged_or_half_written_cache_is_rebuilt(tokenizers, data_file, tmp_path):
    cache = tmp_path / "c"
    enc = encoder(tokenizers["bpe"])
    good = prep.prepare(data_file, enc, cache_dir=cache, skip_bad=True)
    arrow = cache / good.key / "data.arrow"
    reference = pa.ipc.open_stream(
        arrow.read_bytes()
    ).read_all()  # a copy: the damage rewrites the mapped file
    del good.dataset
    damages = {
        "truncated": lambda: arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2]),
        "bytes changed": lambda: arrow.write_bytes(arrow.read_bytes()[:-9] + b"\x00" * 9),
        "no meta (killed before it was written)": lambda: (cache / good.key / "meta.json").unlink(),
        "meta half-written": lambda: (cache / good.key / "meta.json").write_text('{"key": '),
    }
    for what, damage in damages.items():
        damage()
        rebuilt = prep.prepare(data_file, enc, cache_dir=cache, skip_bad=True)
        assert rebuilt.cache == "built", what
        assert rebuilt.dataset.data.table.equals(reference), what
        del rebuilt
    # A killed run's temporary folder is never taken for an entry.
    (cache / f".{good.key}.partial-x").mkdir()
    (cache / f".{good.key}.partial-x" / "data.arrow").write_bytes(b"half")
    assert prep.prepare(data_file, enc, cache_dir=cache, skip_bad=True).cache == "hit"


def test_a_killed_preparations_folder_is_removed_by_the_next(tokenizers, data_file, tmp_path, caplog):
    cache = tmp_path / "c"
    enc = encoder(tokenizers["bpe"])
    key = prep.prepare(data_file, enc, cache_dir=cache, skip_bad=True).key
    shutil.rmtree(cache / key)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    killed = cache / temp_name(key, "partial", pid=ended.pid)  # what a run killed mid-build leaves
    running = cache / temp_name(key, "partial", pid=os.getpid())  # another run building the same entry
    for folder in (killed, running):
        folder.mkdir()
        (folder / ".shard-0.arrow").write_bytes(b"\0" * 2048)
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        assert prep.prepare(data_file, enc, cache_dir=cache, skip_bad=True).cache == "built"
    assert sorted(p.name for p in cache.iterdir()) == sorted([key, running.name])
    assert f"removed 1 leftover(s) of killed runs (2.0 KB freed): {killed.name}" in caplog.text


# ---------------------------------------------------------------- CLI


def test_cli_prepare_prints_counts_and_speed(tokenizer_dirs, data_file, tmp_path, capsys):
    argv = ["prepare", "--data", str(data_file), "--template", "internlm2_chat", "--tokenizer",
            str(tokenizer_dirs["llama"]), "--max-length", "120", "--num-image-tokens", str(N_IMG), "--skip-bad",
            "--output", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "records 40: kept" in out and "truncated" in out and "dropped" in out and "token length: p50" in out
    )
    last = out.strip().splitlines()[-1]
    assert "cached (" in last and "1 process(es)" in last and "records/s" in last and "tokens/s" in last
    assert main(argv) == 0
    assert "cache hit" in capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*argv, "--no-cache", "--num-proc", "2"]) == 0
    assert "cache off; 2 process(es)" in capsys.readouterr().out


def test_cli_prepare_warms_the_cache_training_uses(tokenizer_dirs, tmp_path, monkeypatch, capsys):
    """`llava-ft data prepare` with format auto and a relative path, then training naming the format and the
    absolute path (as a resumed run's config does): one entry, a hit."""
    from llava_ft.config import DataSection, DataSource
    from llava_ft.data.dataset import build_dataset
    from llava_ft.data.tokenizer import load_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    records = corpus(n=12)
    records[5]["conversations"] = [{"from": "gpt", "value": "answer first"}]  # bad: its source is cached too
    write(tmp_path / "data" / "ft.json", records)
    (tmp_path / "data" / "img").mkdir()
    for record in records:  # training checks the images
        for image in [record["image"]] if isinstance(record.get("image"), str) else record.get("image", []):
            Image.new("RGB", (2, 2)).save(tmp_path / "data" / image)
    cache = tmp_path / "cache"
    resolved = tmp_path.resolve() / "data" / "ft.json"
    assert main(["prepare", "--data", "data/ft.json", "--template", "internlm2_chat", "--tokenizer",
                 str(tokenizer_dirs["llama"]), "--max-length", "120", "--num-image-tokens", str(N_IMG),
                 "--skip-bad", "--output", str(cache)]) == 0  # fmt: skip
    assert "cached (" in capsys.readouterr().out
    tok = load_tokenizer(tokenizer_dirs["llama"])
    monkeypatch.setattr(prep, "_build", lambda *a: pytest.fail("a cache miss: the data was tokenized again"))
    for path in (str(tmp_path / "data" / "ft.json"), "data/../data/ft.json"):
        data = DataSection(train=[DataSource(path, format="llava")], template="internlm2_chat", max_length=120,
                           skip_bad=True, cache_dir=str(cache))  # fmt: skip
        ds, stats = build_dataset(data, tok, get_template("internlm2_chat", tok), image_tokens=N_IMG)
        # Sources name the resolved path, whichever spelling prepared the entry.
        assert stats.skipped == 1 and f"{resolved}[5]" in [where for where, _ in stats.problems]
        sources = [str(x) for x in ds.tables[0]["source"]]
        assert len(sources) == stats.kept > 6 and all(x.startswith(f"{resolved}[") for x in sources)
    entries = [e for e in cache.iterdir() if not e.name.startswith(".") and e.name != VERDICTS_DIR]
    assert len(entries) == 1
    # What the format is detected as, not how it was asked for, is the key: another format is another entry.
    assert prep.cache_key_parts("data/ft.json", encoder(tok), "auto", True)["format"] == "llava"
    assert prep.cache_key_parts("data/ft.json", encoder(tok), "xtuner", True)["format"] == "xtuner"


# ---------------------------------------------------------------- reading and processes at scale


def test_json_list_reads_like_json_loads(tmp_path):
    """The .json reader gives json.loads's records, each named by its index, and malformed JSON named by its
    line; the format is detected from the first record alone."""
    from llava_ft.data import sources

    rng = random.Random(0)
    for _ in range(10):
        records = [{"a": rng.random(), "b": "x" * rng.randint(0, 9) + "é🙂\n", "n": rng.randint(-10**6, 10**6),
                    "l": [1, 2.5e10, None, True]} for _ in range(rng.randint(0, 5))]  # fmt: skip
        path = tmp_path / "x.json"
        path.write_text(json.dumps(records, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5))
        expected = [(f"{path}[{i}]", r) for i, r in enumerate(json.loads(path.read_text()))]
        assert list(sources.iter_records(path)) == expected
    for text, line in [('[\n{"a": 1},\n{oops}\n]', 3), ('[{"a":1} {"b":2}]', 1), ('[{"a":1},]', 1),
                       ('[{"a":1}', 1), ('[{"a":1}] x', 1), ('[\n\n{"a": 1,\n', 4)]:  # fmt: skip
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        (tmp_path / "b.json").write_text(text)
        with pytest.raises(DataError, match=rf"b\.json:{line}: malformed JSON"):
            list(sources.iter_records(tmp_path / "b.json"))
    big = [{"messages": [{"role": "user", "content": "é" * 70000}]}, {"text": "x"}]  # past one read
    (tmp_path / "big.json").write_text(json.dumps(big, ensure_ascii=False))
    assert sources.effective_format(tmp_path / "big.json") == "openai"
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert sources.effective_format(tmp_path / "empty.json") == "auto"


@pytest.mark.parametrize("num_proc", [2, 3])
def test_processes_raise_the_first_error_in_record_order(num_proc, tokenizers, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_SIZE", 4)  # errors in batches owned by different processes
    records = corpus(n=30)
    records[26]["conversations"] = [{"from": "gpt", "value": "answer first"}]  # batch 6
    records[13]["conversations"][0]["from"] = "robot"  # batch 3: the first error
    path = write(tmp_path / "bad.json", records)
    enc = encoder(tokenizers["bpe"])
    for n in (1, num_proc):
        with pytest.raises(DataError, match=r"bad\.json\[13\]: .*unknown role 'robot'"):
            prep.prepare(path, enc, use_cache=False, num_proc=n)
    one = prep.prepare(path, enc, use_cache=False, skip_bad=True)
    many = prep.prepare(path, enc, use_cache=False, skip_bad=True, num_proc=num_proc)
    assert many.dataset.data.equals(one.dataset.data)
    assert many.bad.items == one.bad.items and [w[-12:] for w, _ in one.bad.items] == [
        "bad.json[13]",
        "bad.json[26]",
    ]
    assert many.stats.as_dict(1000) == one.stats.as_dict(1000)
    assert not list(tmp_path.glob("**/.shard-*"))  # shard files are removed


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_broken_file_is_reported_before_its_bad_records(skip_bad, tokenizers, tmp_path, monkeypatch):
    """Preparation reads a .json list in one pass; malformed JSON found at its end still wins over a bad
    record before it, in every process count, as a first checking pass would have it."""
    monkeypatch.setattr(prep, "BATCH_SIZE", 4)  # the bad record's batch is encoded before the end is read
    records = corpus(n=30)
    records[2]["conversations"][0]["from"] = "robot"
    text = json.dumps(records, indent=1)
    path = tmp_path / "broken.json"
    path.write_text(text[: text.rindex("}")] + "\n")  # the list is cut short at its last record
    line = path.read_text().count("\n") + 1
    for n in (1, 2):
        with pytest.raises(DataError, match=rf"broken\.json:{line}: malformed JSON"):
            prep.prepare(path, encoder(tokenizers["bpe"]), use_cache=False, num_proc=n, skip_bad=skip_bad)


# ---------------------------------------------------------------- any-resolution: counts from image headers

GEOMETRY = AnyresGeometry.build(32, 4)  # a 32-px tower of 8-px patches, LLaVA-NeXT's five canvases


def write_images(folder: Path, records: list[dict], seed: int = 0) -> dict[str, tuple[int, int]]:
    """Every image the records name, of a random size; returns name -> (height, width)."""
    rng = random.Random(seed)
    sizes = {}
    for record in records:
        names = record.get("image", [])
        for name in [names] if isinstance(names, str) else names:
            sizes[name] = (rng.randint(8, 200), rng.randint(8, 200))
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", sizes[name][::-1], (rng.randrange(256), 0, 0)).save(folder / name)
    return sizes


def anyres_encoder(tok, geometry=GEOMETRY, **kw) -> Encoder:
    return Encoder(tok, get_template("internlm2_chat", tok), max_length=400, image_tokens=geometry, **kw)


def test_anyres_counts_are_those_of_the_real_image_sizes(tokenizers, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_SIZE", 8)  # several batches, so two processes share them
    records = corpus(n=40)
    sizes = write_images(tmp_path, records)
    assert len({GEOMETRY.num_tokens(*s) for s in sizes.values()}) > 5  # the counts do vary
    path = write(tmp_path / "d.json", records)
    enc = anyres_encoder(tokenizers["llama"])
    done = prep.prepare(path, enc, use_cache=False, skip_bad=True)
    table = done.dataset.data
    names = table.column("images").to_pylist()
    counts = table.column("image_tokens").to_pylist()
    assert any(len(c) == 2 for c in counts) and any(not c for c in counts)
    assert counts == [[GEOMETRY.num_tokens(*sizes[n]) for n in row] for row in names]
    # Encoder on each record with the sizes PIL gives: the same samples and counts.
    convs, _ = read_conversations(path)
    samples = []
    for conv in convs:
        try:
            sample = enc.encode_compact(conv, [Image.open(tmp_path / n).size[::-1] for n in conv.images])
        except DataError:
            continue
        samples.append(sample.expand())
    ds = SFTDataset([(done.dataset, tmp_path)])
    assert len(ds) == len(samples) and ds.lengths == [len(s.input_ids) for s in samples]
    for i, sample in enumerate(samples):
        assert ds.tokens(i)[0].tolist() == sample.input_ids and ds.tokens(i)[1].tolist() == sample.labels
    assert ds.image_token_totals() == [sum(c) for c in counts]
    assert sorted(done.stats.tokens_per_image.elements()) == sorted(x for c in counts for x in c)
    # Two processes: the same table; headers are read where the records are encoded.
    two = prep.prepare(path, enc, use_cache=False, skip_bad=True, num_proc=2)
    assert two.dataset.data.equals(table)


def test_anyres_bad_image_header_is_a_bad_record(tokenizers, tmp_path):
    records = corpus(n=12)
    write_images(tmp_path, records)
    (tmp_path / "img" / "1.png").unlink()
    (tmp_path / "img" / "2.png").write_bytes(b"<html>not found</html>")
    path = write(tmp_path / "bad.json", records)
    enc = anyres_encoder(tokenizers["bpe"])
    for num_proc in (1, 2):
        with pytest.raises(DataError) as err:
            prep.prepare(path, enc, use_cache=False, num_proc=num_proc)
        assert str(err.value) == f"{path}[1]: image img/1.png: file not found in {tmp_path}"
    done = prep.prepare(path, enc, use_cache=False, skip_bad=True)
    assert done.bad.items[0] == (f"{path}[1]", f"image img/1.png: file not found in {tmp_path}")
    where, problem = done.bad.items[1]
    assert where == f"{path}[2]" and problem.startswith(
        "image img/2.png: not a readable image (no image format"
    )
    assert len(done.bad) == 2 and done.stats.records == 10 and "\n" not in problem
    # The images' folder is the data file's unless named.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    copy = write(moved / "bad.json", records)
    with pytest.raises(DataError, match=r"bad\.json\[1\]: image img/1\.png: file not found in .*elsewhere"):
        prep.prepare(copy, enc, use_cache=False)
    again = prep.prepare(copy, enc, use_cache=False, skip_bad=True, image_folder=tmp_path)
    assert again.dataset.data.equals(
        done.dataset.data.set_column(
            done.dataset.data.schema.get_field_index("source"),
            "source",
            pa.array(
                [s.replace(str(path), str(copy)) for s in done.dataset.data.column("source").to_pylist()]
            ),
        )
    )


def test_anyres_cache_follows_the_geometry_and_the_image_folder(tokenizers, data_file, tmp_path):
    write_images(tmp_path, corpus())
    cache = tmp_path / "c"
    tok = tokenizers["bpe"]
    base = prep.prepare(data_file, anyres_encoder(tok), cache_dir=cache, skip_bad=True)
    assert base.cache == "built"
    assert prep.prepare(data_file, anyres_encoder(tok), cache_dir=cache, skip_bad=True).cache == "hit"
    fewer = AnyresGeometry.build(32, 4, [[32, 64], [64, 32], [64, 64]])
    capped = AnyresGeometry.build(32, 4, max_tiles=2)
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "img", other / "img")
    variants = {
        "pinpoints": lambda: prep.prepare(data_file, anyres_encoder(tok, fewer), cache_dir=cache, skip_bad=True),
        "max_tiles": lambda: prep.prepare(data_file, anyres_encoder(tok, capped), cache_dir=cache, skip_bad=True),
        "fixed": lambda: prep.prepare(data_file, encoder(tok), cache_dir=cache, skip_bad=True),
        "image folder": lambda: prep.prepare(
            data_file, anyres_encoder(tok), cache_dir=cache, skip_bad=True, image_folder=other),
    }  # fmt: skip
    for what, run in variants.items():
        assert run().cache == "built", what
    # With a fixed count the image folder is no part of the key.
    assert (
        prep.prepare(data_file, encoder(tok), cache_dir=cache, skip_bad=True, image_folder=other).cache
        == "hit"
    )
    assert prep.cache_key_parts(data_file, anyres_encoder(tok), "auto", True)["image_tokens"] == {
        "tile": 32, "patch_grid": 4, "pinpoints": [list(p) for p in GEOMETRY.pinpoints]}  # fmt: skip
