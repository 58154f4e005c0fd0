"""`python -m llava_ft.demo.prepare`: the data folders of each setting, seed and the blank control, the
evaluation files, one tokenizer for every setting, and a rerun that changes nothing (tiny sizes here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm

from llava_ft.demo import prepare as prep
from llava_ft.demo.shapes import QTYPES, SETTINGS, corpus_texts, generate_shapes_dataset, vocab_words
from llava_ft.eval.mmbench import load_mmbench_tsv

N_TRAIN, N_HELDOUT = 24, 8
RUNS = [{"blank": True}, {"setting": "alt", "seed": 2}, {"seed": 1}]


def tiny_sizes(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(prep, "N_TRAIN_IMAGES", N_TRAIN)
    mp.setattr(prep, "N_HELDOUT_IMAGES", N_HELDOUT)
    mp.setattr(prep, "LLM_SHAPE", {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
                                    "num_kv_heads": 1})  # fmt: skip
    mp.setattr(prep, "CLIP_SHAPE", {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        tiny_sizes(mp)
        for kw in RUNS:
            assets = prep.prepare(root, **kw)
            assert assets.data.root == prep.data_dir(root, kw.get("setting", "default"), kw.get("seed", 0))
            assert (assets.llm / "config.json").is_file() and assets.clip.is_dir()
    return root


def test_rerun_is_a_no_op(root, monkeypatch):
    tiny_sizes(monkeypatch)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    for kw in RUNS:
        prep.prepare(root, **kw)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_data_dirs(root):
    assert prep.data_dir(root) == root / "shapes"
    assert prep.data_dir(root, blank=True) == root / "shapes_blank"
    assert prep.data_dir(root, "alt", 2) == root / "shapes_alt_2"
    assert prep.data_dir(root, seed=1, blank=True) == root / "shapes_default_1_blank"
    made = {p.name for p in root.iterdir() if (p / "manifest.json").is_file()}
    assert made == {"shapes", "shapes_blank", "shapes_alt_2", "shapes_default_1"}
    for name, setting, seed, blank in [("shapes", "default", 0, False), ("shapes_blank", "default", 0, True),
                                       ("shapes_alt_2", "alt", 2, False), ("shapes_default_1", "default", 1, False)]:  # fmt: skip
        params = json.loads((root / name / "manifest.json").read_text())["params"]
        assert (params["setting"], params["seed"], params["blank"]) == (setting, seed, blank)
        assert (params["n_train_images"], params["n_heldout_images"]) == (N_TRAIN, N_HELDOUT)


@pytest.mark.parametrize("name", ["shapes", "shapes_blank", "shapes_alt_2", "shapes_default_1"])
def test_eval_files(root, name):
    folder = root / name
    heldout = json.loads((folder / "heldout.json").read_text())
    open_records = [r for r in heldout if r["style"] == "open"]
    lines = [json.loads(line) for line in (folder / "heldout_vqa.jsonl").read_text().splitlines()]
    assert len(lines) == len(open_records) == N_HELDOUT
    for line, r in zip(lines, open_records):
        assert line["question_id"] == r["id"] and line["image"] == r["image"]
        assert "\n" not in line["question"] and "<image>" not in line["question"]  # no lettered options
        assert line["answers"] == [r["conversations"][1]["value"]] * 10
        assert line["answer_type"] == r["qtype"] in QTYPES
        assert line["combination"] == r["combination"] in ("seen", "unseen")
    assert {line["combination"] for line in lines} == {"seen", "unseen"}
    mmbench = load_mmbench_tsv(folder / "heldout_mmbench.tsv")
    mains = [row for row in mmbench.rows if row.is_main]
    assert len(mains) == N_HELDOUT and len(mmbench.rows) == 4 * N_HELDOUT
    assert {(row.category, row.l2_category) for row in mains} <= {
        (t, c) for t in QTYPES for c in ("seen", "unseen")
    }


def test_tokenizer_knows_every_setting(root):
    sp = spm.SentencePieceProcessor(model_file=str(root / "models" / "tokenizer" / "tokenizer.model"))
    assert 100 <= sp.get_piece_size() <= 1000
    for setting in SETTINGS:
        for word in vocab_words(setting):
            assert sp.unk_id() not in sp.encode(word) and sp.unk_id() not in sp.encode(" " + word), word
            for part in re.findall(r"\w+", word):  # "option's": the tokenizer's words are runs of \w
                assert sp.encode(part, out_type=str) == [part] and sp.encode(" " + part, out_type=str) == [
                    "▁" + part
                ]
    # The texts of a dataset the tokenizer was not built from (the alt setting) encode without <unk> too.
    for text in corpus_texts(generate_shapes_dataset(root / "shapes_alt_2", n_train_images=N_TRAIN,
                                                     n_heldout_images=N_HELDOUT, seed=2, setting="alt")):  # fmt: skip
        ids = sp.encode(text)
        assert sp.unk_id() not in ids and sp.decode(ids) == text


def test_main_prints_the_assets(root, monkeypatch, capsys):
    calls = []
    assets = prep.TinyAssets(SimpleNamespace(root=root / "data"), root / "llm", root / "clip")
    monkeypatch.setattr(prep, "prepare", lambda *a, **kw: calls.append((a, kw)) or assets)
    assert prep.main(["--root", str(root), "--seed", "4", "--setting", "alt", "--blank"]) == 0
    assert calls == [((str(root),), {"blank": True, "seed": 4, "setting": "alt"})]
    assert capsys.readouterr().out.split() == [
        "tiny",
        "assets:",
        "data",
        f"{root / 'data'},",
        "llm",
        f"{root / 'llm'},",
        "clip",
        str(root / "clip"),
    ]
    with pytest.raises(SystemExit):
        prep.main(["--setting", "nope"])
