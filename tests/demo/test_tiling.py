"""The tiling demo end to end at toy size, through its own runner (llava_ft.demo.tiling, what
scripts/tiling_demo.sh runs): prepare, configs/tiny_tiling trained at fixed resolution and tiled, the blank
control, and the side-by-side table. Run in a scratch folder; extra flags change only steps, batch and split
sizes. Checks that every part runs, that the two runs differ only in tiling, and the table's form, not
accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from llava_ft.demo import tiling

N_TRAIN, N_HELDOUT = 16, 8
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny_tiling"


def test_the_tiling_demo_runs_and_prints_the_runs_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the prepared-data cache
    monkeypatch.setattr(tiling, "N_TRAIN_IMAGES", N_TRAIN)
    monkeypatch.setattr(tiling, "N_HELDOUT_IMAGES", N_HELDOUT)
    quick = ["--train.max_steps", "2", "--train.batch_size", "4"]
    # The targets are not met by 2 steps: --check exits 1; only the format is checked here.
    assert (
        tiling.main(["--check", "--batch-size", "16"], stage_flags={"pretrain": quick, "finetune": quick})
        == 1
    )
    printed = capsys.readouterr().out
    out = Path("work_dirs/tiny_tiling")
    for run, stages in (("fixed", 2), ("anyres", 2), ("blank", 1)):
        for stage in ("pretrain", "finetune")[2 - stages :]:
            assert json.loads((out / run / stage / "summary.json").read_text())["steps"] == 2
    assert f"$ llava-ft train {CONFIGS / 'pretrain.yaml'} --overwrite" in printed

    # The recipe is any-resolution; the fixed run differs from it by `model.vision.anyres: null` alone.
    saved = {
        run: yaml.safe_load((out / run / "finetune" / "llava_ft.yaml").read_text())
        for run in ("fixed", "anyres")
    }
    assert saved["anyres"]["model"]["vision"]["anyres"]["grid_pinpoints"] == [
        [128, 256],
        [256, 128],
        [256, 256],
    ]
    assert saved["fixed"]["model"]["vision"]["anyres"] is None
    for config in saved.values():
        config["model"]["vision"]["anyres"] = None
        config["train"]["output_dir"] = config["train"]["init_from"] = config["model"]["llm"] = None
    assert saved["fixed"] == saved["anyres"]
    blank = yaml.safe_load((out / "blank" / "finetune" / "llava_ft.yaml").read_text())
    assert blank["train"]["init_from"].endswith("work_dirs/tiny_tiling/anyres/pretrain")
    assert blank["data"]["train"][0]["path"].endswith("data/demo/tiling/detail_blank/finetune.json")

    table = json.loads((out / "heldout" / "table.json").read_text())
    assert list(table["rows"]) == ["fixed", "anyres", "blank"] and table["chance"] == 0.25
    for run, c in table["rows"].items():
        assert c["n"] == N_HELDOUT and 0 <= c["low"] <= c["accuracy"] <= c["high"] <= 1, run
        # every held-out open-ended question answered, by the code of `llava-ft eval vqa`
        predictions = (out / "heldout" / run / "vqa" / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == N_HELDOUT
    md = (out / "heldout" / "table.md").read_text()
    assert md.strip() in printed
    assert [line.split(" | ")[0] for line in md.splitlines()[2:]] == [
        "| fixed",
        "| anyres",
        "| blank",
        "| chance",
    ]
    assert "target missed: anyres open-ended" in printed
    # the demo's questions are open-ended (no lettered options to learn)
    assert not any(
        "\nA. " in r["conversations"][0]["value"]
        for r in json.loads(Path("data/demo/tiling/detail/finetune.json").read_text())
    )
