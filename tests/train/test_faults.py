"""An image that fails to load mid-run (changed after the data was checked): replaced under data.skip_bad, the
run ending as an uninterrupted one would, or a one-line error that --resume continues from once it is fixed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data._utils.worker import ExceptionWrapper
from transformers import TrainerCallback

from llava_ft.cli import main as cli_main
from llava_ft.config import DataSource, dump_config
from llava_ft.data import dataset as dataset_module
from llava_ft.data.conversation import DataError
from llava_ft.data.faults import ImageFault
from llava_ft.testing.callbacks import StopAt
from llava_ft.train.run import train
from llava_ft.train.trainer import RUN_TOTALS


class Damage(TrainerCallback):
    """Overwrites image files with non-image bytes once training runs (after preparation checked them): at the
    start, or at the end of step `step`."""

    def __init__(self, paths: list[Path], step: int = 0):
        self.paths, self.step = paths, step

    def _damage(self) -> None:
        for path in self.paths:
            path.write_bytes(b"<html>not an image</html>")

    def on_train_begin(self, args, state, control, **kwargs):
        if self.step == 0:
            self._damage()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self._damage()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.fixture
def images_data(shapes, tmp_path) -> tuple[Path, Path, list[str]]:
    """12 image records of the shapes data over copies of their images: (data file, image folder, image names)."""
    records = [r for r in json.loads(shapes.finetune.read_text()) if "image" in r][:12]
    folder = tmp_path / "images"
    folder.mkdir()
    for r in records:
        shutil.copy(shapes.images_dir / r["image"], folder / r["image"])
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, folder, [r["image"] for r in records]


@pytest.fixture
def cfg(llava_cfg, images_data, tmp_path):
    """One epoch of the 12 records, two per step: every record is drawn once."""
    path, folder, _ = images_data

    def make(out: Path, **train_kw):
        c = llava_cfg(out, stage="finetune", llm_mode="lora", **{"max_steps": 6, "batch_size": 2, **train_kw})
        c.data.train = [DataSource(path=str(path), format="llava", image_folder=str(folder))]
        c.data.cache_dir = str(tmp_path / "cache")
        return c

    return make


def test_skip_bad_replaces_a_sample_whose_image_fails_and_resume_ends_the_same(
    cfg, images_data, tmp_path, caplog
):
    _, folder, names = images_data
    bad = sorted(names[::4])  # 3 of the 12
    kwargs = dict(save_steps=2, save_total_limit=5)

    pristine = {n: (folder / n).read_bytes() for n in bad}

    def run(out: str, callbacks=(), **kw):
        c = cfg(tmp_path / out, **kwargs)
        c.data.skip_bad = True
        for name, data in pristine.items():  # whole when the data is prepared, damaged once training runs
            (folder / name).write_bytes(data)
        return train(c, callbacks=[Damage([folder / n for n in bad]), *callbacks], **kw)

    with caplog.at_level("WARNING", logger="llava_ft"):
        full = run("full")
    assert full.summary["image_faults"]["count"] == 3
    replaced = full.summary["image_faults"]["replaced"]
    assert sorted(Path(f["image"]).name for f in replaced) == bad
    assert all(re.fullmatch(r".*data\.json\[\d+\]", f["record"]) for f in replaced), replaced
    assert all(f["problem"].startswith("not a readable image") for f in replaced), replaced
    assert caplog.text.count("in its place (data.skip_bad)") == 3
    assert (
        full.summary["samples"] == 12
    )  # the replacements trained, and were counted, in the failed ones' place

    run("cut", callbacks=[StopAt(2)])
    stored = json.loads((tmp_path / "cut" / "checkpoint-2" / "trainer_state.json").read_text())
    assert stored["stateful_callbacks"][RUN_TOTALS]["counts"]["samples"] == 4
    resumed = run("cut", resume=True)
    assert worst(trainable(resumed.model), trainable(full.model)) < 1e-5
    for key in ("samples", "tokens", "tokens_trained", "pad_share"):
        assert resumed.summary[key] == full.summary[key], key
    assert resumed.summary["image_faults"]["count"] == 3
    assert sorted(f["image"] for f in resumed.summary["image_faults"]["replaced"]) == sorted(
        f["image"] for f in replaced
    )


def test_skip_bad_replacements_keep_packed_rows_as_planned(cfg, images_data, tmp_path):
    """Packed rows are planned from the samples' lengths: a replacement of the same length keeps them."""
    path, folder, names = images_data
    # The shapes questions vary in length: the record after each damaged one asks the same, so a replacement
    # of the same length is there to take.
    records = json.loads(path.read_text())
    for k in range(0, len(records), 4):
        records[k + 1]["conversations"] = records[k]["conversations"]
    path.write_text(json.dumps(records))
    c = cfg(tmp_path / "packed", max_steps=-1, epochs=1)
    c.data.skip_bad = c.data.packing = True
    result = train(c, callbacks=[Damage([folder / n for n in names[::4]])])
    assert result.summary["image_faults"]["count"] == 3 and result.summary["samples"] == 12


def test_without_skip_bad_a_failed_image_stops_the_run_and_resume_continues_once_fixed(
    cfg, images_data, tmp_path
):
    _, folder, names = images_data
    kwargs = dict(save_steps=1, save_total_limit=10)
    full = train(cfg(tmp_path / "full", **kwargs))
    pristine = {n: (folder / n).read_bytes() for n in names}

    with pytest.raises(ImageFault) as err:
        train(cfg(tmp_path / "cut", **kwargs), callbacks=[Damage([folder / n for n in names], step=2)])
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(
        r".*data\.json\[\d+\]: image \S+\.png: not a readable image .*--resume continues from checkpoint-[23];"
        r" data\.skip_bad .*",
        message,
    ), message

    for name, data in pristine.items():  # fixed
        (folder / name).write_bytes(data)
    resumed = train(cfg(tmp_path / "cut", **kwargs), resume=True)
    assert worst(trainable(resumed.model), trainable(full.model)) < 1e-5
    assert resumed.summary["samples"] == full.summary["samples"] == 12
    assert resumed.summary["tokens"] == full.summary["tokens"]


def test_the_cli_names_a_failed_image_in_one_line_from_a_dataloader_worker(
    cfg, tmp_path, monkeypatch, capsys
):
    """A worker process's exception reaches the trainer through torch's re-raise, which rebuilds it from text."""

    def unreadable(path, *args, **kwargs):
        raise DataError(str(path), "not a readable image (planted)")

    monkeypatch.setattr(dataset_module, "load_image", unreadable)  # inherited by the forked worker
    c = cfg(tmp_path / "run", dataloader_workers=1)
    dump_config(c, tmp_path / "run.yaml")
    assert cli_main.main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # After the progress bar's last "\r" redraw: the Trainer's bar is left open on an exception.
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("llava-ft: error:")]
    assert len(errors) == 1, err[-3000:]
    assert re.fullmatch(
        r"llava-ft: error: \S*data\.json\[\d+\]: image \S+\.png: not a readable image \(planted\) "
        r"\(no checkpoint-N saved yet: .*\)",
        errors[0],
    ), errors[0]


def test_an_image_fault_survives_torchs_reraise_from_a_worker():
    fault = ImageFault("data.json[3]", "/data/images/a b.png", "image data is corrupt (OSError: cut short)")
    try:
        raise fault
    except ImageFault:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ImageFault) as err:
        wrapped.reraise()
    assert (
        str(err.value)
        == "data.json[3]: image /data/images/a b.png: image data is corrupt (OSError: cut short)"
    )
    assert (err.value.where, err.value.image, err.value.reason) == (fault.where, fault.image, fault.reason)


def test_any_data_error_survives_torchs_reraise_from_a_worker():
    """Errors other than image faults (a collator's, a record's) stay one line too."""
    try:
        raise DataError("data.jsonl:7", "sample has images but the model has no vision tower")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(DataError) as err:
        wrapped.reraise()
    assert str(err.value) == "data.jsonl:7: sample has images but the model has no vision tower"
    assert err.value.where == "data.jsonl:7"
