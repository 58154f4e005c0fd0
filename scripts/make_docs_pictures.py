"""Make the README's pictures from the tiny demo: docs/report.png and docs/serve.png.

    .venv/bin/python scripts/make_docs_pictures.py [--pretrain work_dirs/tiny/pretrain] [--out docs] [--report-only]

Trains the tiny finetune stage again into --work (about a minute on CPU; it starts from the demo's pretrain
stage, so run `bash scripts/demo.sh` or pretrain.sh first) and copies the report.png that run drew (its eval
loss and held-out VQA accuracy are the run's own, logged during training), then starts `llava-ft serve` on it, asks two questions about a held-out
image in headless chromium (`bash scripts/setup_browser.sh`) and takes a screenshot of the page.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from llava_ft.testing.browser import CHROMIUM_FLAGS, chromium_path

REPO = Path(__file__).resolve().parents[1]


def report_picture(pretrain: Path, work: Path, out: Path) -> Path:
    """The retrained finetune stage's own report.png: its loss, eval loss and benchmark panels come from the
    run (configs/tiny/finetune.yaml evaluates on data.val_size and scores the held-out VQA split each epoch)."""
    from llava_ft.config import load_config
    from llava_ft.report import REPORT_NAME
    from llava_ft.train.run import train

    if not (pretrain / "llava_ft.yaml").is_file():
        sys.exit(f"{pretrain}: no pretrain stage output; run `bash scripts/demo.sh` (or pretrain.sh) first")
    overrides = {"train.output_dir": str(work / "finetune"), "train.init_from": str(pretrain)}
    stage = train(
        load_config(REPO / "configs/tiny/finetune.yaml", overrides, for_training=True), overwrite=True
    )
    return Path(shutil.copyfile(stage.output_dir / REPORT_NAME, out / REPORT_NAME))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_picture(checkpoint: Path, image: Path, questions: list[str], out: Path) -> Path:
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    argv = [sys.executable, "-m", "llava_ft.cli.main", "serve", str(checkpoint), "--port", str(port)]
    server = subprocess.Popen([*argv, "--max-new-tokens", "16"], env=env, stdout=subprocess.DEVNULL)
    profile = tempfile.mkdtemp(prefix="llava_ft_chromium_")
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"llava-ft serve exited with {server.returncode}")
                time.sleep(0.5)
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=chromium_path() or "/usr/bin/chromium",
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1200, "height": 860},
            )
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(str(image))
            page.wait_for_function("document.querySelector('#status').innerText.startsWith('New image')")
            for n, question in enumerate(questions, 1):
                page.fill("#question textarea", question)
                page.click("#send")
                page.wait_for_function(
                    f"document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === {n} && "
                    "document.querySelector('#status').innerText.startsWith('Answered')"
                )
                # The page clears the question box in a follow-up event; the next fill must come after it.
                page.wait_for_function("document.querySelector('#question textarea').value === ''")
            path = out / "serve.png"
            page.screenshot(path=str(path))
            context.close()
    finally:
        server.terminate()
        server.wait(timeout=15)
        shutil.rmtree(profile, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pretrain", default="work_dirs/tiny/pretrain", help="the demo's pretrain stage output"
    )
    parser.add_argument("--work", default="work_dirs/docs", help="where the retrained finetune stage goes")
    parser.add_argument("--out", default="docs", help="folder for report.png and serve.png")
    parser.add_argument(
        "--report-only", action="store_true", help="docs/report.png alone (no browser needed)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)  # the tiny configs name repository-relative paths
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"report: {report_picture(Path(args.pretrain), Path(args.work), out)}")
    if args.report_only:
        return 0

    heldout = json.loads(Path("data/demo/shapes/heldout.json").read_text())
    # A single-shape image, asked in the demo's own question phrasings (as its finetune conversations are).
    record = next(r for r in heldout if r["qtype"] == "position")  # position is asked of one shape only
    image = Path("data/demo/shapes/images") / record["image"]
    questions = ["What colour is the shape?", "Where is the shape?"]
    print(f"page: {serve_picture(Path(args.work) / 'finetune', image, questions, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
