"""Nothing in the package, the tests or the scripts reads a path outside the repository, so a user's clone
runs the same code and the same checks. System paths (/dev/null, /usr/bin/chromium) are fine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("llava_ft", "tests", "scripts")
# (what it finds, why it is outside the repository)
OUTSIDE: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"(?<![\w.~-])/(work|root|home|mnt|scratch)/"), "an absolute path on one machine"),
    (re.compile(r"\.\./shared\b"), "a folder beside the repository"),
    (re.compile(r"\bshared/(reference|bench)\b"), "a workspace folder that a clone does not have"),
    (re.compile(r"\bFACTS\b"), "notes that are not in the repository"),
)
# Tests write under pytest's tmp_path and code takes its paths as arguments; scripts may default a scratch root
# that they or another script of the repository fill.
TMP = re.compile(r"(?<![\w.~-])/tmp/")


def problems_in(text: str, *, tmp_allowed: bool) -> list[str]:
    found = [f"{m.group(0)!r}: {why}" for pattern, why in OUTSIDE for m in pattern.finditer(text)]
    if not tmp_allowed and TMP.search(text):
        found.append("'/tmp/': a fixed path outside the repository")
    return found


def scanned_files() -> list[Path]:
    files = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            # This file is left out: its examples below are the very strings the check finds.
            if path.is_file() and "__pycache__" not in path.parts and path != Path(__file__).resolve():
                files.append(path)
    return files


def test_no_path_outside_the_repository():
    files = scanned_files()
    assert len(files) > 50  # the walk found the repository
    report = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary data: no paths to read
            continue
        rel = path.relative_to(ROOT)
        for number, line in enumerate(text.splitlines(), start=1):
            for problem in problems_in(line, tmp_allowed=rel.parts[0] == "scripts"):
                report.append(f"{rel}:{number}: {problem}: {line.strip()}")
    assert not report, "paths outside the repository:\n" + "\n".join(report)


@pytest.mark.parametrize(
    "line",
    [
        'REFERENCE = Path("/work/shared/reference/chat_templates.json")',
        "see ../shared/bench/xtuner_prep/setup.sh",
        "(see shared/reference/notes.md)",
        "# the trap (FACTS.md, GPU figures)",
        "cache = '/root/.cache/huggingface'",
        'open("/tmp/tokenizer/vocab.json")',
    ],
)
def test_outside_paths_are_found(line):
    assert problems_in(line, tmp_allowed=False)


@pytest.mark.parametrize(
    "line",
    [
        "subprocess.run(cmd, stdout=open('/dev/null', 'w'))",
        'CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")',
        'REFERENCE = Path(__file__).parent / "reference" / "chat_templates.json"',
        "x = shared_memory.size  # facts about the cache",
        'ROOT="${1:-/tmp/xtb}"',
    ],
)
def test_system_paths_and_scratch_roots_pass(line):
    assert not problems_in(line, tmp_allowed=True)
