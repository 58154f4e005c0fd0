"""`llava-ft serve --share` reaches gradio's launch as share=True, and only when asked; no tunnel is opened
(the tests run offline): gradio's launch is replaced by one that records its arguments."""

from __future__ import annotations

import logging

import pytest

from llava_ft.cli import serve as serve_module
from llava_ft.cli.main import main


@pytest.fixture
def launched(monkeypatch) -> dict:
    import gradio as gr

    class TextOnly:
        has_vision = False

    kwargs: dict = {}
    monkeypatch.setattr(serve_module, "read_stage_config", lambda ckpt: None)
    monkeypatch.setattr(serve_module, "load_assistant", lambda *a, **k: TextOnly())
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: kwargs.update(kw))
    yield kwargs
    logging.getLogger("llava_ft").setLevel(logging.NOTSET)


@pytest.mark.parametrize("share", [True, False])
def test_share_reaches_gradio_launch(launched, share, monkeypatch, caplog):
    monkeypatch.setenv("GRADIO_SHARE", "True")  # gradio's own switch must not open a link unasked
    assert main(["serve", "ckpt", *(["--share"] if share else [])]) == 0
    assert launched["share"] is share
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("anyone with the public gradio.live link can use" in m for m in warned) is share


def test_share_help_says_the_link_is_public(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--share" in help_text
    assert "public https://*.gradio.live link" in help_text
    assert "up to a week" in help_text and "anyone with the link can use the model" in help_text
