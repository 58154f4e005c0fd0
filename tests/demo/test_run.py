"""The demo runner's child-process stage (the blank-image control runs beside the real finetune) and its
flags."""

from __future__ import annotations

import pytest

from llava_ft.demo import run as demo_run


def test_a_failing_child_stage_names_its_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "blank" / "finetune.log"
    child = demo_run.start_stage("finetune", {"train.no_such_key": 1}, [], log, threads=1)
    assert "$ llava-ft train" in capsys.readouterr().out  # printed like the stages run in this process
    with pytest.raises(SystemExit) as failed:
        child.wait()
    message = str(failed.value)
    assert f"stage finetune failed (its output: {log})" in message
    assert "no_such_key" in message and "no_such_key" in log.read_text()  # the child's own error, shown


@pytest.mark.parametrize("epochs", ["0", "-1", "nan", "inf"])
def test_finetune_epochs_must_be_a_positive_number(epochs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        demo_run.main(["--finetune-epochs", epochs])
    assert refused.value.code == 2
    assert f"--finetune-epochs must be a positive number, got {float(epochs)}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any data or checkpoint is made
