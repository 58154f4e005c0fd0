"""results.json and results.md: where the figures come from (provenance) and markdown tables."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

UNKNOWN_CHECKPOINT = "(unknown: not recorded in the predictions file)"


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def provenance(
    records: list[dict], *, checkpoint: str | None, data: Path, command: str, predictions_file: Path | None
) -> dict:
    """Where the figures come from: the checkpoint(s) and weights fingerprint(s) named in the prediction records
    scored (a re-scored file may come from anywhere; `checkpoint`, the one asked now, when none is named), the
    data file's digest and the command."""
    names = sorted({r["checkpoint"] for r in records if isinstance(r.get("checkpoint"), str)})
    checkpoints = names or [checkpoint or UNKNOWN_CHECKPOINT]
    weights = sorted({r["weights"] for r in records if isinstance(r.get("weights"), str)})
    return {
        "checkpoint": checkpoints[0] if len(checkpoints) == 1 else checkpoints,
        "weights": weights[0] if len(weights) == 1 else weights or None,
        "predictions_from": str(predictions_file) if predictions_file else None,
        "data": {"path": str(data), "sha256": sha256_file(data)},
        "command": command,
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance_markdown(results: dict) -> list[str]:
    rule = results["rule"]
    ckpt = results["checkpoint"]
    lines = [
        f"- checkpoint: `{ckpt}`"
        if isinstance(ckpt, str)
        else f"- checkpoints: {', '.join(f'`{c}`' for c in ckpt)}",
        f"- weights: `{results['weights']}`" if results.get("weights") else "- weights: not recorded",
        f"- data: `{results['data']['path']}` (sha256 `{results['data']['sha256']}`)",
        f"- command: `{results['command']}`",
        f"- rule: **{rule['name']}**: {rule['description']}",
    ]
    if results.get("predictions_from"):
        lines.append(f"- predictions re-scored from `{results['predictions_from']}`")
    return lines


def write_report(output: Path, results: dict, markdown: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (output / "results.md").write_text(markdown.rstrip() + "\n", encoding="utf-8")
