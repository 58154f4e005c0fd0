"""Held-out accuracy of a tiny-demo checkpoint, per question type, next to chance.

    python -m llava_ft.demo.evaluate CHECKPOINT [--data data/demo/shapes] [--json OUT]

An answer is right when it equals the expected one-word (or two-word position) answer exactly, after
stripping case and punctuation: an open-ended answer, so chance is 1 / (answers of that type).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from llava_ft.data.images import load_image
from llava_ft.demo.shapes import chance_levels
from llava_ft.inference import Query, load_assistant


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def evaluate(
    checkpoint: str | Path, data_root: str | Path, *, batch_size: int = 64, limit: int | None = None
) -> dict:
    root = Path(data_root)
    records = json.loads((root / "heldout.json").read_text())[:limit]
    assistant = load_assistant(str(checkpoint))
    queries = []
    for r in records:
        question = r["conversations"][0]["value"]
        queries.append(Query(question=question, image=load_image(root / "images" / r["image"])))
    answers: list[str] = []
    for start in range(0, len(queries), batch_size):
        answers += assistant.generate(queries[start : start + batch_size], max_new_tokens=6)
    right, total = Counter(), Counter()
    for r, answer in zip(records, answers, strict=True):
        total[r["qtype"]] += 1
        right[r["qtype"]] += normalise(answer) == normalise(r["conversations"][1]["value"])
    chance = chance_levels()
    per_type = {
        q: {"accuracy": right[q] / total[q], "chance": chance[q], "n": total[q]} for q in sorted(total)
    }
    n = sum(total.values())
    return {
        "checkpoint": str(checkpoint),
        "data": str(root),
        "accuracy": sum(right.values()) / n,
        "chance": sum(chance[q] * total[q] for q in total) / n,
        "n": n,
        "per_type": per_type,
        "examples": [
            {
                "question": q.question,
                "answer": a,
                "expected": r["conversations"][1]["value"],
                "image": r["image"],
            }
            for q, a, r in list(zip(queries, answers, records, strict=True))[:4]
        ],
    }


def format_report(result: dict, label: str) -> str:
    lines = [
        f"{label}: held-out accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}, n={result['n']})"
    ]
    for q, r in result["per_type"].items():
        lines.append(f"  {q:<9} {r['accuracy']:.3f}  (chance {r['chance']:.2f}, n={r['n']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument(
        "--data", default="data/demo/shapes", help="shapes dataset folder (heldout.json, images/)"
    )
    parser.add_argument("--label", default="model")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = evaluate(args.checkpoint, args.data, limit=args.limit)
    print(format_report(result, args.label))
    for ex in result["examples"]:
        print(f"  e.g. {ex['image']}: {ex['question']!r} -> {ex['answer']!r} (expected {ex['expected']!r})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
