"""The image check before training: every image decoded once (in forked processes), verdicts cached by size and
mtime, bad records skipped or stopping the run before the model is built; preparation's workers end with their
parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil  # installed with accelerate, which requires it
import pytest
from PIL import Image, ImageFile

from llava_ft.config import DataSection, DataSource
from llava_ft.data import image_check
from llava_ft.data.conversation import DataError
from llava_ft.data.dataset import build_dataset
from llava_ft.data.forked import run_forked
from llava_ft.data.image_check import VERDICTS_DIR, check_images, verdicts_file
from llava_ft.data.templates import get_template
from llava_ft.testing.quirks import quirks_records, write_quirks

N_IMG = 4
REPO = Path(__file__).parents[2]


@pytest.fixture
def quirks(tmp_path):
    return write_quirks(tmp_path / "images")


def no_decoding(monkeypatch) -> None:
    monkeypatch.setattr(image_check, "image_problem", lambda path: pytest.fail(f"{path} was decoded"))


def assert_quirks_verdicts(check, quirks) -> None:
    assert sorted(check.problems) == sorted(quirks.bad)  # every good one passes
    for name, words in quirks.bad.items():
        assert words in check.problems[name], (name, check.problems[name])


@pytest.mark.parametrize("num_proc", [1, 2])
def test_quirks_are_judged_as_load_image_does(num_proc, quirks, tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # a truncated JPEG must fail the full decode
    names = quirks.names * 3  # named by several records: checked once
    check = check_images(quirks.folder, names, num_proc=num_proc, cache_dir=tmp_path / "cache")
    assert_quirks_verdicts(check, quirks)
    assert check.images == len(quirks.names) and check.missing == 1 and check.decoded == len(quirks.names) - 1
    assert check.processes == num_proc
    assert f"images {len(quirks.names)}: 5 bad (1 missing)" in check.summary()


def test_warm_check_decodes_nothing_and_a_changed_file_is_decoded_again(quirks, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cold = check_images(quirks.folder, quirks.names, cache_dir=cache)
    assert verdicts_file(quirks.folder, cache).parent == cache / VERDICTS_DIR
    with monkeypatch.context() as m:
        no_decoding(m)
        warm = check_images(quirks.folder, quirks.names, cache_dir=cache)
    assert warm.problems == cold.problems and warm.decoded == 0 and "0 decoded" in warm.summary()

    # Same name, new content: a size or modification time that differs is decoded again; the rest is known.
    grey = quirks.folder / "grey.png"
    grey.write_bytes(grey.read_bytes()[:40])
    fixed = quirks.folder / "truncated.jpg"
    stamp = fixed.stat()
    Image.new("RGB", (5, 5)).save(fixed, format="JPEG")
    os.utime(fixed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    touched = quirks.folder / "rgba.png"  # same bytes, a new modification time
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    decoded = []
    real = image_check.image_problem
    monkeypatch.setattr(
        image_check, "image_problem", lambda path: decoded.append(Path(path).name) or real(path)
    )
    again = check_images(quirks.folder, quirks.names, cache_dir=cache)
    assert sorted(decoded) == ["grey.png", "rgba.png", "truncated.jpg"] and again.decoded == 3
    assert "grey.png" in again.problems and "truncated.jpg" not in again.problems


def test_cache_off_keeps_no_verdicts(quirks, tmp_path):
    cache = tmp_path / "cache"
    for _ in range(2):
        check = check_images(quirks.folder, quirks.names, cache_dir=cache, use_cache=False)
        assert_quirks_verdicts(check, quirks)
        assert check.decoded == len(quirks.names) - 1
    assert not cache.exists()


def test_verdicts_of_other_files_are_kept_and_a_damaged_or_foreign_file_is_ignored(
    quirks, tmp_path, monkeypatch, caplog
):
    cache = tmp_path / "cache"
    first, second = quirks.names[:6], quirks.names[6:]
    check_images(quirks.folder, first, cache_dir=cache)
    check_images(quirks.folder, second, cache_dir=cache)  # another data file over the same folder
    with monkeypatch.context() as m:
        no_decoding(m)
        assert_quirks_verdicts(check_images(quirks.folder, quirks.names, cache_dir=cache), quirks)

    file = verdicts_file(quirks.folder, cache)
    file.write_bytes(file.read_bytes()[:100])  # damaged
    with caplog.at_level("WARNING", logger="llava_ft"):
        check = check_images(quirks.folder, quirks.names, cache_dir=cache)
    assert check.decoded == len(quirks.names) - 1 and "unreadable" in caplog.text
    monkeypatch.setattr(image_check, "checker_version", lambda: "another checker")
    assert check_images(quirks.folder, quirks.names, cache_dir=cache).decoded == len(quirks.names) - 1


# ---------------------------------------------------------------- build_dataset and training


def quirks_section(quirks, tmp_path, **kw) -> DataSection:
    path = tmp_path / "quirks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in quirks_records(quirks)))
    source = DataSource(str(path), image_folder=str(quirks.folder))
    return DataSection(
        train=[source], template="internlm2_chat", max_length=64, cache_dir=str(tmp_path / "c"), **kw
    )


def test_bad_images_stop_the_build_naming_the_record(quirks, tokenizers, tmp_path):
    tok = tokenizers["llama"]
    data = quirks_section(quirks, tmp_path)
    with pytest.raises(DataError) as err:
        build_dataset(data, tok, get_template("internlm2_chat", tok), image_tokens=N_IMG)
    first_bad = len(quirks.good) + 1  # records follow quirks.names: the good ones first
    assert str(err.value).startswith(
        f"{data.train[0].path}:{first_bad}: image truncated.jpg: image data is corrupt"
    )
    assert str(err.value).endswith("; 4 more record(s) with bad images (data.skip_bad skips them)")
    assert "\n" not in str(err.value)


def test_skip_bad_counts_the_bad_images_and_a_warm_build_decodes_nothing(
    quirks, tokenizers, tmp_path, monkeypatch, caplog
):
    tok = tokenizers["llama"]
    template = get_template("internlm2_chat", tok)
    data = quirks_section(quirks, tmp_path, skip_bad=True)
    for warm in (False, True):
        if warm:
            no_decoding(monkeypatch)
        with caplog.at_level("INFO", logger="llava_ft"):
            ds, stats = build_dataset(data, tok, template, image_tokens=N_IMG)
        assert len(ds) == stats.kept == len(quirks.good) and stats.skipped == 5 and stats.records == 13
        problems = dict(stats.problems)
        for k, name in enumerate(quirks.names):
            where = f"{data.train[0].path}:{k + 1}"
            if name in quirks.bad:
                assert problems[where].startswith(f"image {name}: ") and quirks.bad[name] in problems[where]
            else:
                assert where not in problems
        assert "5 record(s) skipped: image missing or unreadable" in caplog.text
    assert "0 decoded" in caplog.text  # the warm build's line


def test_cache_off_checks_the_images_too(quirks, tokenizers, tmp_path):
    tok = tokenizers["llama"]
    data = quirks_section(quirks, tmp_path, skip_bad=True, cache=False)
    ds, stats = build_dataset(data, tok, get_template("internlm2_chat", tok), image_tokens=N_IMG)
    assert stats.skipped == 5 and len(ds) == len(quirks.good) and not (tmp_path / "c").exists()


def test_training_stops_on_a_bad_image_before_the_model_is_built(quirks, tmp_path, monkeypatch):
    from llava_ft.testing.tiny_llava import tiny_config
    from llava_ft.train import run

    cfg = tiny_config(tmp_path / "models")
    cfg.data = quirks_section(quirks, tmp_path)
    cfg.train.output_dir = str(tmp_path / "out")
    monkeypatch.setattr(run, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(DataError, match=r"quirks\.jsonl:9: image truncated\.jpg: image data is corrupt"):
        run.train(cfg)


# ---------------------------------------------------------------- workers end with their parent


def _start_and_kill(script: str, tmp_path: Path) -> list[psutil.Process]:
    """Run `script` in a subprocess until it has two worker processes, kill it -9; return its workers as they
    were before the kill."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=tmp_path)
    parent = psutil.Process(proc.pid)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2:
            assert proc.poll() is None, "the preparation ended before its workers started"
            assert time.monotonic() < deadline, "no workers started"
            time.sleep(0.1)
            workers = parent.children()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except BaseException:
        proc.kill()
        raise
    return workers


def _assert_gone(workers: list[psutil.Process]) -> None:
    try:
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{len(alive)} worker(s) outlived their parent"
    finally:
        for p in workers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_preparation_workers_end_with_their_parent(tokenizer_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    data.write_text((json.dumps(record) + "\n") * 600)
    workers = _start_and_kill(
        f"""
        import time
        from transformers import AutoTokenizer
        from llava_ft.data import prepare as prep
        from llava_ft.data.templates import get_template
        from llava_ft.data.tokenize import Encoder

        tok = AutoTokenizer.from_pretrained({str(tokenizer_dirs["llama"])!r})
        encoder = Encoder(tok, get_template("internlm2_chat", tok), max_length=64, image_tokens=4)
        prep._encode_shard = lambda *args: time.sleep(600)  # workers busy until the parent is killed
        prep.prepare({str(data)!r}, encoder, use_cache=False, num_proc=2)
        """,
        tmp_path,
    )
    _assert_gone(workers)


def test_image_check_workers_end_with_their_parent(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(64):
        (folder / f"{k}.png").touch()
    workers = _start_and_kill(
        f"""
        import time
        from llava_ft.data import image_check

        image_check.image_problem = lambda path: time.sleep(600)  # workers busy until the parent is killed
        image_check.check_images({str(folder)!r}, [f"{{k}}.png" for k in range(64)], num_proc=2, use_cache=False)
        """,
        tmp_path,
    )
    _assert_gone(workers)


def test_forked_jobs_return_in_order_and_a_failed_or_dead_one_is_named():
    seen = []
    results = run_forked(
        [lambda progress: (progress(2), "a")[1], lambda progress: "b"], what="x", progress=seen.append
    )
    assert results == ["a", "b"] and seen[-1] == 2
    with pytest.raises(RuntimeError, match=r"image check process \S+ failed:\n(.|\n)*ZeroDivisionError"):
        run_forked([lambda progress: 1, lambda progress: 1 / 0], what="image check")
    with pytest.raises(RuntimeError, match=r"image check process \S+ died \(exit code 3\)"):
        run_forked([lambda progress: os._exit(3)], what="image check")
