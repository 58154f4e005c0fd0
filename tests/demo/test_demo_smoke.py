"""The demo pipeline end to end at toy size, through the demo's own runner (llava_ft.demo.run, what
scripts/demo.sh runs): prepare, text -> pretrain -> finetune with configs/tiny as they are, the blank-image
control finetune, and the final report on both. Run in a scratch folder, so the recipe's own relative paths
(data/demo, work_dirs/tiny) land there; extra flags change only steps, batch and split sizes. Checks that
every part runs and the outputs are well formed, not accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llava_ft.cli.main import main as llava_ft
from llava_ft.demo import prepare, robustness
from llava_ft.demo import run as demo_run
from llava_ft.demo.evaluate import COLUMNS, SPLITS

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny"
N_TRAIN, N_HELDOUT = 24, 8


def overrides(stage: str, benchmark: bool = True) -> list[str]:
    """A couple of steps on small batches, whatever else the recipe says; a val split and an eval during
    training that fit the toy data, where the recipe has them (the control has no benchmark)."""
    cfg = yaml.safe_load((TINY / f"{stage}.yaml").read_text())
    out = ["--train.max_steps", "2", "--train.batch_size", "4"]
    if cfg.get("data", {}).get("val_size") is not None:
        out += ["--data.val_size", "4"]
    if benchmark and isinstance(cfg["train"].get("eval_benchmark"), dict):
        out += ["--train.eval_benchmark.limit", "4", "--train.eval_benchmark.max_new_tokens", "4"]
    return out


@pytest.mark.slow
def test_the_demo_pipeline_runs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the prepared-data cache
    monkeypatch.setattr(prepare, "N_TRAIN_IMAGES", N_TRAIN)
    monkeypatch.setattr(prepare, "N_HELDOUT_IMAGES", N_HELDOUT)
    flags = {stage: overrides(stage) for stage in ("text", "pretrain", "finetune")}
    flags["control"] = overrides("finetune", benchmark=False)
    flags["tower"] = ["--steps", "2"]
    # The targets are not met by 2 steps: --check exits 1; only the format is checked here.
    assert demo_run.main(["--check", "--finetune-epochs", "7"], stage_flags=flags) == 1
    printed = capsys.readouterr().out
    for stage in ("work_dirs/tiny/finetune", "work_dirs/tiny/blank/finetune"):
        assert json.loads(Path(stage, "summary.json").read_text())["steps"] == 2
        # --finetune-epochs reaches the real finetune and its control alike (max_steps wins here).
        assert yaml.safe_load(Path(stage, "llava_ft.yaml").read_text())["train"]["epochs"] == 7
    assert f"$ llava-ft train {TINY / 'finetune.yaml'} --overwrite" in printed
    # Both LLaVA stages read the tower stage's output.
    assert json.loads(Path("work_dirs/tiny/tower/tower.json").read_text())["training"]["steps"] == 2
    for stage in ("pretrain", "finetune"):
        config = yaml.safe_load(Path("work_dirs/tiny", stage, "llava_ft.yaml").read_text())
        assert config["model"]["vision"]["model"] == f"local-dir:{tmp_path / 'work_dirs/tiny/tower'}"

    out = tmp_path / "work_dirs" / "tiny" / "heldout"
    table = json.loads((out / "table.json").read_text())
    for run in ("real", "blank"):
        for split, n in (("all", N_HELDOUT), ("seen", N_HELDOUT // 2), ("unseen", N_HELDOUT // 2)):
            for column in COLUMNS:
                c = table["rows"][run][split][column]
                assert c["n"] == n and 0 <= c["low"] <= c["accuracy"] <= c["high"] <= 1, (run, split, column)
        for bench in ("vqa", "mmbench"):
            results = json.loads((out / run / bench / "results.json").read_text())
            assert results["checkpoint"] == f"work_dirs/tiny{'/blank' if run == 'blank' else ''}/finetune"
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
    assert any(line.startswith("target missed: ") for line in lines[lines.index(md.splitlines()[-1]) :])


@pytest.mark.slow
def test_the_demo_runs_on_another_seed_and_setting(tmp_path, monkeypatch, capsys):
    """The same recipe pointed at other data (another seed, the alt setting) by the runner's own overrides;
    the summary gives each run's cells and min..max per setting."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(prepare, "N_TRAIN_IMAGES", N_TRAIN)
    monkeypatch.setattr(prepare, "N_HELDOUT_IMAGES", N_HELDOUT)
    flags = {stage: overrides(stage) for stage in ("text", "pretrain", "finetune")}
    flags["control"] = overrides("finetune", benchmark=False)
    flags["tower"] = ["--steps", "2"]
    assert robustness.main(["--runs", "default:1", "alt:2"], stage_flags=flags) == 0
    printed = capsys.readouterr().out
    for name, data in (("default_1", "shapes_default_1"), ("alt_2", "shapes_alt_2")):
        table = json.loads(Path("work_dirs/tiny_runs", name, "heldout", "table.json").read_text())
        assert table["checkpoints"]["real"]["data"] == f"data/demo/{data}"
        assert table["checkpoints"]["blank"]["data"] == f"data/demo/{data}_blank"
        config = yaml.safe_load(Path("work_dirs/tiny_runs", name, "finetune", "llava_ft.yaml").read_text())
        # (a stage output records its paths absolute)
        assert config["data"]["train"][0]["path"] == str(tmp_path / f"data/demo/{data}/finetune.json")
        assert config["train"]["eval_benchmark"]["data"].endswith(f"data/demo/{data}/heldout_vqa.jsonl")
    summary = json.loads(Path("work_dirs/tiny_runs/summary.json").read_text())
    assert set(summary["runs"]) == {"default:1", "alt:2"} and set(summary["ranges"]) == {"default", "alt"}
    assert "default min..max (1)" in printed and "alt min..max (1)" in printed
