"""Tiny base models and shapes data shared by the training tests (written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_ft.config import DataSource
from llava_ft.testing.tiny_llava import tiny_config


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    from llava_ft.demo.shapes import generate_shapes_dataset

    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train_images=48, n_heldout_images=4)


@pytest.fixture
def llava_cfg(tiny_root, shapes):
    return lambda out, **kw: _llava_cfg(tiny_root, shapes, out, **kw)


def _llava_cfg(root: Path, shapes, out: Path, *, stage: str, llm_mode: str, **train):
    """A tiny pretrain/finetune config on the shapes data; a few steps, logging every step."""
    cfg = tiny_config(root, llm_mode=llm_mode, template="plain" if stage == "pretrain" else "internlm2_chat")
    data = shapes.pretrain if stage == "pretrain" else shapes.finetune
    cfg.data.train = [DataSource(path=str(data), format="llava", image_folder=str(shapes.images_dir))]
    cfg.data.max_length = 96
    cfg.train.output_dir = str(out)
    cfg.train.batch_size = 4
    cfg.train.max_steps = 4
    cfg.train.lr = 1e-2
    cfg.train.logging_steps = 1
    cfg.train.report_to = "none"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg
