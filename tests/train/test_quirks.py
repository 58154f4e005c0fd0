"""A training file with the quirks of the real LLaVA releases, end to end: every bad image is found before the
model is built, skipped and counted under data.skip_bad; the odd but readable ones train."""

from __future__ import annotations

import json

import pytest

from llava_ft.config import DataSource
from llava_ft.data.conversation import DataError
from llava_ft.testing.quirks import peer_records, quirks_records, write_quirks
from llava_ft.train import run


@pytest.fixture
def quirks_cfg(llava_cfg, tmp_path):
    quirks = write_quirks(tmp_path / "images")
    records = quirks_records(quirks) + peer_records()
    data = tmp_path / "quirks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = llava_cfg(tmp_path / "out", stage="finetune", llm_mode="lora", max_steps=3)
    cfg.data.train = [DataSource(path=str(data), format="llava", image_folder=str(quirks.folder))]
    cfg.data.max_length = 256
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg, quirks, data


def test_without_skip_bad_the_first_bad_image_stops_the_run_before_the_model(quirks_cfg, monkeypatch):
    cfg, quirks, data = quirks_cfg

    def build_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(run, "build_model", build_model)
    first_bad = len(quirks.good) + 1  # records are written good images first
    with pytest.raises(DataError, match=rf"^{data}:{first_bad}: image truncated\.jpg: .*truncated.*"
                       r"; 4 more record\(s\) with bad images \(data\.skip_bad skips them\)$"):  # fmt: skip
        run.train(cfg)


def test_with_skip_bad_the_bad_images_are_skipped_and_counted_and_the_rest_trains(quirks_cfg):
    cfg, quirks, data = quirks_cfg
    cfg.data.skip_bad = True
    result = run.train(cfg)
    counts = json.loads((result.output_dir / "summary.json").read_text())["data"]
    kept = len(quirks.good) + len(peer_records())
    assert (counts["records"], counts["kept"], counts["skipped"], counts["trimmed"]) == (kept + 5, kept, 5, 1)
    named = {where: problem for where, problem in counts["problems"]}
    for line, name in enumerate(quirks.names, start=1):
        if name in quirks.bad:
            assert quirks.bad[name] in named.pop(f"{data}:{line}")
    assert (
        not named
    )  # nothing else was a problem: grey, CMYK, palette, RGBA, 16-bit, GIF, 1x1, panorama train
    assert result.summary["steps"] == 3
