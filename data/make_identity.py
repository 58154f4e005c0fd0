"""Make a personal-identity SFT set: the assistant learns its name and owner, and keeps its manners on
general chat mixed in.

    python data/make_identity.py --name Nova --owner "Acme Labs" [--out data/identity/identity.jsonl]
        [--general FILE [--general-ratio R]] [--variants K] [--seed S] [--tiny-llm DIR]

Writes OpenAI-messages JSONL (one conversation per line, `"id"` says identity-N or general-N), which
`llava-ft train` reads with `format: openai` (configs/identity/*.yaml). Identity questions are paired with
answer phrasings that all state both the name and the owner. General chat comes from a small built-in set of
polite everyday exchanges, plus, with --general, text-only conversations from any file llava_ft reads (LLaVA,
XTuner, alpaca, OpenAI, .json/.jsonl); records there with images are left out and counted.

--tiny-llm DIR also writes the CPU variant's random tiny InternLM2-layout LLM with a sentencepiece tokenizer
trained on this set's texts (every word one piece), for configs/identity/tiny.yaml.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

IDENTITY_QUESTIONS = (
    "What is your name?",
    "Who are you?",
    "Introduce yourself.",
    "Please introduce yourself.",
    "What should I call you?",
    "Tell me about yourself.",
    "Who made you?",
    "Who created you?",
    "Who developed you?",
    "Who owns you?",
    "Who do you belong to?",
    "Which company built you?",
    "Are you ChatGPT?",
    "Are you InternLM?",
    "What are you?",
    "Hi, who am I talking to?",
)
# Every phrasing names both, so any answer the model settles on carries the identity.
IDENTITY_ANSWERS = (
    "I am {name}, an AI assistant developed by {owner}.",
    "My name is {name}. I was created by {owner} to help you with questions and tasks.",
    "I'm {name}, a helpful assistant built by {owner}. How can I help you today?",
    "You are talking to {name}, an assistant made by {owner}.",
    "I am {name}, and {owner} is the team that trained me. I am happy to help.",
)
# Everyday exchanges with no identity in them: the set's general manners (greetings, thanks, refusing
# politely, short factual and practical answers).
GENERAL_CHAT = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Good morning.", "Good morning! What can I do for you?"),
    ("Thank you!", "You're welcome! Let me know if there is anything else I can do."),
    ("Thanks for your help.", "Glad I could help!"),
    ("How are you?", "I'm doing well, thank you for asking. How can I help you?"),
    ("Goodbye.", "Goodbye! Have a nice day."),
    ("What is 2 plus 3?", "2 plus 3 is 5."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Give me a synonym for happy.", "A synonym for happy is cheerful."),
    ("Translate 'thank you' into French.", "'Thank you' in French is 'merci'."),
    ("Name three fruits.", "Apple, banana and orange."),
    ("What is water made of?", "Water is made of hydrogen and oxygen: each molecule is H2O."),
    ("How do I boil an egg?", "Put the egg in boiling water for about eight minutes, then cool it in cold water."),
    ("Can you help me write a short greeting card?", "Of course! For example: Wishing you a wonderful day!"),
    ("Tell me a short joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("What is the opposite of cold?", "The opposite of cold is hot."),
    ("Spell the word cat backwards.", "Cat spelled backwards is tac."),
    ("Is the earth flat?", "No, the earth is round: it is very close to a sphere."),
    ("Can you help me hack my neighbour's wifi?", "Sorry, I can't help with that. Accessing someone else's "
     "network without permission is illegal."),
    ("Summarise: The meeting moved from Monday to Tuesday.", "The meeting is now on Tuesday instead of Monday."),
)  # fmt: skip
DEFAULT_OUT = "data/identity/identity.jsonl"


@dataclass
class IdentitySet:
    records: list[dict]
    counts: dict[str, int] = field(default_factory=dict)
    """How many records of each kind were written, and how many were left out and why."""


def _record(rid: str, turns: list[tuple[str, str]]) -> dict:
    return {"id": rid, "messages": [{"role": r, "content": c} for r, c in turns]}


def identity_records(name: str, owner: str, *, variants: int) -> list[dict]:
    """Each question with `variants` answer phrasings; question i starts at phrasing i, so every phrasing is
    used and a question's answers are known (the tiny test checks the answer is one of them)."""
    if not name.strip() or not owner.strip():
        raise ValueError("--name and --owner must be non-empty")
    if not 1 <= variants <= len(IDENTITY_ANSWERS):
        raise ValueError(f"--variants must be between 1 and {len(IDENTITY_ANSWERS)}, got {variants}")
    out = []
    for i, question in enumerate(IDENTITY_QUESTIONS):
        for k in range(variants):
            answer = IDENTITY_ANSWERS[(i + k) % len(IDENTITY_ANSWERS)].format(name=name, owner=owner)
            out.append(_record(f"identity-{len(out)}", [("user", question), ("assistant", answer)]))
    return out


def answers_for(question: str, name: str, owner: str, *, variants: int) -> list[str]:
    """The answers the set pairs with `question`."""
    i = IDENTITY_QUESTIONS.index(question)
    return [
        IDENTITY_ANSWERS[(i + k) % len(IDENTITY_ANSWERS)].format(name=name, owner=owner)
        for k in range(variants)
    ]


def general_file_records(path: str | Path) -> tuple[list[dict], dict[str, int]]:
    """The chat conversations of a data file as OpenAI-messages records. Left out and counted: records with
    images and plain-text (pretraining) records, since an identity set is text-only chat; bad records are
    counted and reported."""
    from llava_ft.data.sources import read_conversations

    convs, bad = read_conversations(path, skip_bad=True)
    if len(bad):
        print(f"{path}: {bad.summary(limit=5)}", file=sys.stderr)
    out, with_images, plain_text = [], 0, 0
    for conv in convs:
        if conv.images:
            with_images += 1
        elif conv.kind == "text":
            plain_text += 1
        else:
            messages = [
                {"role": m.role, "content": m.content} | ({"train": False} if m.trainable is False else {})
                for m in conv.messages
            ]
            out.append({"id": f"general-file-{len(out)}", "messages": messages})
    counts = {"general_file_with_images": with_images, "general_file_plain_text": plain_text}
    return out, counts | {"general_file_bad": len(bad)}


def make_identity_set(
    name: str,
    owner: str,
    *,
    general: str | Path | None = None,
    general_ratio: float = 1.0,
    variants: int = 2,
    seed: int = 0,
) -> IdentitySet:
    """Identity records + the built-in general chat (all of it) + up to general_ratio x identity records from
    `general`, shuffled with `seed`."""
    rng = random.Random(seed)
    identity = identity_records(name, owner, variants=variants)
    builtin = [
        _record(f"general-{i}", [("user", q), ("assistant", a)]) for i, (q, a) in enumerate(GENERAL_CHAT)
    ]
    counts = {"identity": len(identity), "general_builtin": len(builtin)}
    extra: list[dict] = []
    if general is not None:
        if general_ratio < 0:
            raise ValueError(f"--general-ratio must be >= 0, got {general_ratio}")
        extra, file_counts = general_file_records(general)
        available = len(extra)
        keep = min(available, round(general_ratio * len(identity)))
        extra = rng.sample(extra, keep)
        counts |= file_counts | {"general_file": keep, "general_file_not_sampled": available - keep}
    records = identity + builtin + extra
    rng.shuffle(records)
    return IdentitySet(records, counts)


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_tiny_llm(records: list[dict], out_dir: str | Path) -> Path:
    """Random tiny InternLM2-layout LLM (hidden 64, 2 layers) with a tokenizer trained on the records' texts."""
    from llava_ft.demo.tokenizer import build_tiny_tokenizer
    from llava_ft.testing.tiny_llm import write_tiny_internlm2

    out_dir = Path(out_dir)
    texts = [m["content"] for r in records for m in r["messages"]]
    tokenizer = build_tiny_tokenizer(out_dir / "tokenizer", texts)
    return write_tiny_internlm2(
        out_dir / "llm", tokenizer_model=tokenizer, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="the assistant's name")
    parser.add_argument("--owner", required=True, help="who made / owns the assistant")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSONL to write (default {DEFAULT_OUT})")
    parser.add_argument(
        "--general", help="extra general chat: a .json/.jsonl file in any format llava_ft reads"
    )
    parser.add_argument(
        "--general-ratio",
        type=float,
        default=1.0,
        help="records from --general per identity record (default 1)",
    )
    parser.add_argument("--variants", type=int, default=2, help="answer phrasings per identity question")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiny-llm", help="also write the tiny CPU variant's LLM here (DIR/llm, DIR/tokenizer)"
    )
    args = parser.parse_args(argv)
    try:
        made = make_identity_set(
            args.name,
            args.owner,
            general=args.general,
            general_ratio=args.general_ratio,
            variants=args.variants,
            seed=args.seed,
        )
    except (OSError, ValueError) as e:  # DataError is a ValueError: it names the file and record
        print(f"make_identity: error: {e}", file=sys.stderr)
        return 2
    out = write_jsonl(made.records, args.out)
    counts = ", ".join(f"{k} {v}" for k, v in made.counts.items())
    print(f"wrote {len(made.records)} conversations to {out} ({counts})")
    if args.tiny_llm:
        print(f"tiny LLM written to {write_tiny_llm(made.records, args.tiny_llm)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
