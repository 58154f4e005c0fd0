"""`--preflight`: two steps on the longest samples into a temporary folder, a reload, one answer, an estimate."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import datasets
import pytest

import llava_ft.train.preflight as pf
from llava_ft.cli.main import main
from llava_ft.config import dump_config
from llava_ft.data.dataset import SFTDataset
from llava_ft.data.packing import PackedDataset
from llava_ft.train.preflight import LongestFirst, PreflightReport, preflight


class _Lengths:
    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)


def test_the_hook_yields_the_longest_first():
    lengths = [5, 9, 1, 9, 7, 3]
    sampler = LongestFirst()(_Lengths(lengths))
    assert [lengths[i] for i in sampler] == sorted(lengths, reverse=True)
    assert list(sampler)[:2] == [1, 3]  # ties in index order
    assert len(sampler) == len(lengths)


def test_largest_sample_counts_its_image_tokens():
    rows = {
        "input_ids": [[1, -200, 2], [1, -200, 2, -200], [1, 2, 3, 4]],
        "labels": [[1, 2, 3]] * 3,
        "images": [["a.png"], ["a.png", "b.png"], []],
        "image_tokens": [[40], [30, 25], []],
        "source": ["0", "1", "2"],
        "length": [42, 57, 4],
    }
    dataset = SFTDataset([(datasets.Dataset.from_dict(rows), Path("."))])
    assert pf.largest_sample(dataset) == (57, 55)
    assert pf.largest_sample(PackedDataset(dataset, dataset.lengths, 100)) == (57, 55)
    assert pf.largest_sample(None) == (0, 0)
    report = PreflightReport(step_s=1.0, first_step_s=2.0, peak_memory_mb=123.0, on_gpu=False, planned_steps=4,
                             timed_lengths=[57, 42], trained_tokens=99, mean_length=34.3, largest_tokens=57,
                             largest_image_tokens=55, packed=False, question="q", image=None, answer="a")  # fmt: skip
    assert (
        "largest sample: 57 tokens (55 image + 2 text); the peak memory above covers it (the timed longest "
        "samples are at least as long)" in report.lines()
    )


@pytest.fixture
def spy(monkeypatch) -> dict:
    """What preflight's hook was given (the train dataset's item lengths) and what its sampler yields."""
    seen: dict = {}

    class Spy(LongestFirst):
        def __call__(self, dataset):
            sampler = super().__call__(dataset)
            seen["lengths"] = pf.item_lengths(dataset)
            seen["yielded"] = [seen["lengths"][i] for i in sampler]
            return sampler

    monkeypatch.setattr(pf, "LongestFirst", Spy)
    return seen


def _folder(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _check_figures(report: PreflightReport) -> None:
    lines = report.lines()
    assert report.step_s > 0 and report.first_step_s > 0 and report.peak_memory_mb > 0
    assert sum(line.startswith("answer: ") for line in lines) == 1
    estimate = next(line for line in lines if line.startswith("estimate: "))
    steps, step_s, hours = re.match(
        r"estimate: (\d+) optimizer steps x ([\d.e-]+) s = ([\d.e-]+) h", estimate
    ).groups()
    assert int(steps) == report.planned_steps > 0
    assert float(hours) == pytest.approx(int(steps) * float(step_s) / 3600, rel=2e-3)
    assert 0 < report.token_hours <= report.hours


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_preflight_trains_the_longest_and_leaves_nothing(llava_cfg, tmp_path, spy, packing):
    out = tmp_path / "out"
    if packing:  # an earlier run's folder: left as it is
        (out / "checkpoint-3").mkdir(parents=True)
        (out / "summary.json").write_text('{"steps": 3}')
    before = _folder(out) if out.exists() else None
    cfg = llava_cfg(out, stage="finetune", llm_mode="lora", epochs=3, max_steps=-1)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.packing = packing
    cfg.train.grad_accum = 2 if packing else 1  # a step of two batches: timed and counted as one
    temp = tmp_path / "tmp"
    temp.mkdir()

    report = preflight(cfg, temp_root=temp)

    assert spy["yielded"] == sorted(spy["lengths"], reverse=True)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    assert report.timed_lengths == sorted(spy["lengths"], reverse=True)[: 2 * per_step]
    assert report.trained_tokens == sum(report.timed_lengths)  # what trained is what the hook put first
    assert report.packed == packing
    assert report.planned_steps == 3 * math.ceil(len(spy["lengths"]) / per_step)
    assert report.mean_length == pytest.approx(sum(spy["lengths"]) / len(spy["lengths"]))
    if not packing:  # items are samples: the largest is the first timed
        assert report.largest_tokens == max(spy["lengths"]) == report.timed_lengths[0]
    assert 0 <= report.largest_image_tokens < report.largest_tokens <= max(report.timed_lengths)
    _check_figures(report)
    assert report.image is not None and report.question == pf.IMAGE_QUESTION
    assert list(temp.iterdir()) == []
    assert (_folder(out) if out.exists() else None) == before
    assert any((tmp_path / "cache").iterdir())  # the prepared data stays for the real run


def test_bad_data_is_a_one_line_error_and_leaves_nothing(llava_cfg, tmp_path, monkeypatch, capsys):
    records = [
        {"id": "a", "image": "absent.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A shape."}]},
    ]  # fmt: skip
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    cfg = llava_cfg(tmp_path / "out", stage="finetune", llm_mode="lora")
    cfg.data.train[0].path = str(data)
    cfg.data.cache_dir = str(tmp_path / "cache")
    dump_config(cfg, tmp_path / "run.yaml")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(pf.tempfile, "tempdir", str(temp))

    assert main(["train", str(tmp_path / "run.yaml"), "--preflight"]) == 2

    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("llava-ft: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
    assert str(data) in errors[0] and "absent.png" in errors[0]
    assert list(temp.iterdir()) == []
    assert not (tmp_path / "out").exists()
