"""The demo pipeline end to end at toy size: prepare, text -> pretrain -> finetune with configs/tiny as
they are, a blank-image control finetune, and the final report on both. Run in a scratch folder, so the
recipe's own relative paths (data/demo, work_dirs/tiny) land there; overrides change only steps, batch and
split sizes and the control's data. Checks that every part runs and the outputs are well formed, not
accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llava_ft.cli.main import main as llava_ft
from llava_ft.demo import evaluate, prepare
from llava_ft.demo.evaluate import COLUMNS, SPLITS

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny"
N_TRAIN, N_HELDOUT = 24, 8


def overrides(stage: str) -> list[str]:
    """A couple of steps on small batches, whatever else the recipe says; a val split and an eval during
    training that fit the toy data, where the recipe has them."""
    cfg = yaml.safe_load((TINY / f"{stage}.yaml").read_text())
    out = ["--train.max_steps", "2", "--train.batch_size", "4"]
    if cfg.get("data", {}).get("val_size") is not None:
        out += ["--data.val_size", "4"]
    if isinstance(cfg["train"].get("eval_benchmark"), dict):
        out += ["--train.eval_benchmark.limit", "4", "--train.eval_benchmark.max_new_tokens", "4"]
    return out


def blank_data(stage: str) -> list[str]:
    """The control: the stage's data files, read from the blank-image dataset instead."""
    cfg = yaml.safe_load((TINY / f"{stage}.yaml").read_text())
    out = []
    for i, source in enumerate(cfg["data"]["train"]):
        for key in ("path", "image_folder"):
            if key in source:
                out += [f"--data.train.{i}.{key}", source[key].replace("demo/shapes/", "demo/shapes_blank/")]
    return out


@pytest.mark.slow
def test_the_demo_pipeline_runs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the prepared-data cache
    monkeypatch.setattr(prepare, "N_TRAIN_IMAGES", N_TRAIN)
    monkeypatch.setattr(prepare, "N_HELDOUT_IMAGES", N_HELDOUT)
    prepare.prepare("data/demo", blank=True)

    for stage in ("text", "pretrain", "finetune"):
        assert llava_ft(["train", str(TINY / f"{stage}.yaml"), *overrides(stage)]) == 0, stage
    control = ["--train.output_dir", "work_dirs/tiny_blank/finetune", "--train.eval_benchmark", "null"]
    control += blank_data("finetune")
    assert llava_ft(["train", str(TINY / "finetune.yaml"), *overrides("finetune"), *control]) == 0
    for stage in ("work_dirs/tiny/finetune", "work_dirs/tiny_blank/finetune"):
        assert json.loads(Path(stage, "summary.json").read_text())["steps"] == 2
    capsys.readouterr()

    argv = [
        "--real",
        "work_dirs/tiny/finetune",
        "--blank",
        "work_dirs/tiny_blank/finetune",
        "--batch-size",
        "16",
    ]
    assert evaluate.main([*argv, "--check"]) in (0, 1)  # the targets are not met by 2 steps; only the format
    printed = capsys.readouterr().out

    out = tmp_path / "work_dirs" / "tiny" / "heldout"
    table = json.loads((out / "table.json").read_text())
    for run in ("real", "blank"):
        for split, n in (("all", N_HELDOUT), ("seen", N_HELDOUT // 2), ("unseen", N_HELDOUT // 2)):
            for column in COLUMNS:
                c = table["rows"][run][split][column]
                assert c["n"] == n and 0 <= c["low"] <= c["accuracy"] <= c["high"] <= 1, (run, split, column)
        for bench in ("vqa", "mmbench"):
            results = json.loads((out / run / bench / "results.json").read_text())
            assert results["checkpoint"] == f"work_dirs/tiny{'_blank' if run == 'blank' else ''}/finetune"
    assert set(table["chance"]) == set(SPLITS) and 0 < table["chance"]["all"]["circular"] < 0.01
    md = (out / "table.md").read_text()
    assert md.strip() in printed
    assert [line.split(" | ")[0] for line in md.splitlines()[2:9]] == [
        *(f"| {run} images, {split}" for run in ("real", "blank") for split in SPLITS),
        "| chance",
    ]
    # The figures are those of a separate `llava-ft eval` run (same batch size).
    real = ["--checkpoint", "work_dirs/tiny/finetune", "--batch-size", "16"]
    vqa = ["--data", "data/demo/shapes/heldout_vqa.jsonl", "--images", "data/demo/shapes/images"]
    assert llava_ft(["eval", "vqa", *real, *vqa, "--output", "sep/vqa", "--prompt-suffix", ""]) == 0
    mmbench = ["--data", "data/demo/shapes/heldout_mmbench.tsv", "--output", "sep/mmbench"]
    assert llava_ft(["eval", "mmbench", *real, *mmbench]) == 0
    separate = {b: json.loads(Path("sep", b, "results.json").read_text()) for b in ("vqa", "mmbench")}
    cells = table["rows"]["real"]["all"]
    assert cells["open"]["accuracy"] == separate["vqa"]["headline"]["value"]
    assert cells["circular"]["accuracy"] == separate["mmbench"]["scores"]["circular"]["value"]
    assert cells["single"]["accuracy"] == separate["mmbench"]["scores"]["single_main"]["value"]
    for bench in ("vqa", "mmbench"):  # the same answers, not only the same (untrained: near zero) scores
        ours, theirs = (Path(d, bench, "predictions.jsonl").read_text() for d in (out / "real", "sep"))
        assert [json.loads(x)["prediction"] for x in ours.splitlines()] == [
            json.loads(x)["prediction"] for x in theirs.splitlines()
        ]
    lines = printed.splitlines()
    assert all(line.startswith("target missed: ") for line in lines[lines.index(md.splitlines()[-1]) + 2 :])
