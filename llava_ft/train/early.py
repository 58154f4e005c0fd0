"""Checks of a training run's inputs that need only the config and the file system: run by `llava-ft train`
before torch and transformers are imported and before any model loads, so a wrong path or flag is reported in
a second, in one line naming it, rather than after minutes of loading."""

from __future__ import annotations

import re
from pathlib import Path

from llava_ft.config import ConfigError, RunConfig
from llava_ft.model.names import check_names

# The Trainer's checkpoint folder names (transformers.trainer_utils.PREFIX_CHECKPOINT_DIR, not imported for it).
_CHECKPOINT = re.compile(r"checkpoint-\d+")


def check_inputs(
    cfg: RunConfig, source: str | Path | None = None, *, resume: bool | str = False, preflight: bool = False
) -> None:
    """ConfigError naming the field (after `source`, the config file, when given) or flag: a name the code does
    not know (model.names.check_names: projector, data format, chat template with the nearest name), a data file
    or image folder that is not there, or --resume with nothing to resume. resume: False, "auto" (the newest
    checkpoint-N in train.output_dir) or a checkpoint folder."""
    check_names(cfg, source)
    try:
        check_data_paths(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source is not None else str(e)) from None
    if resume and not preflight:
        check_resume(Path(cfg.train.output_dir), resume)


def check_data_paths(cfg: RunConfig) -> None:
    for i, src in enumerate(cfg.data.train):
        if not Path(src.path).exists():
            raise ConfigError(f"data.train[{i}].path: {src.path}: no such file or folder")
        if src.image_folder is not None and not Path(src.image_folder).is_dir():
            raise ConfigError(f"data.train[{i}].image_folder: {src.image_folder}: no such folder")


def check_resume(output_dir: Path, resume: bool | str) -> None:
    """Something to resume: a checkpoint-N folder in output_dir ("auto"/True), or the folder given holding a
    Trainer checkpoint. Whether the newest one is complete is train()'s check (it reads the files)."""
    if resume in ("auto", True):
        found = output_dir.is_dir() and any(
            _CHECKPOINT.fullmatch(p.name) and p.is_dir() for p in output_dir.iterdir()
        )
        if not found:
            raise ConfigError(
                f"--resume: no checkpoint-N folder in {output_dir} (train.output_dir): nothing to resume; "
                "leave out --resume to start the run"
            )
        return
    folder = Path(resume)
    if not folder.is_dir():
        raise ConfigError(f"--resume {folder}: no such folder")
    if not (folder / "trainer_state.json").is_file():
        raise ConfigError(
            f"--resume {folder}: not a checkpoint (no trainer_state.json); give a checkpoint-N folder of the run"
        )
