"""How many examples the tiny demo LLM needs before it answers lettered multiple choice, from text alone.

    .venv/bin/python scripts/bench_demo_mc.py [--rope-bases 1e6,1e4] [--steps 1200] [--batch-size 32]

The easiest form of the demo's multiple-choice task: the fact is written in the prompt ("the shapes are red."),
then the question in LLaVA's MMBench prompt (2-4 shuffled options, the answer's letter trained). Answering
takes two attention steps that must form together: each option word picks up its letter, and the answer
position finds the option that matches the fact. Each RoPE base trains a fresh random tiny LLM of the demo's
shape (`llava_ft.demo.prepare.LLM_SHAPE`, the demo's tokenizer) with AdamW at a constant rate, and prints the
held-out accuracy (4 options, chance 0.25; the letter with the highest logit) every `--every` steps and the
first step at which it reaches 0.5 and 0.9. Needs the tiny assets (`python -m llava_ft.demo.prepare`); makes
them if missing. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from llava_ft.data.conversation import Conversation, Message  # noqa: E402
from llava_ft.data.templates import get_template  # noqa: E402
from llava_ft.data.tokenizer import load_tokenizer  # noqa: E402
from llava_ft.demo.prepare import LLM_SHAPE, prepare  # noqa: E402
from llava_ft.demo.shapes import LETTERS, QTYPES, SETTINGS, Setting, _options, mc_prompt  # noqa: E402
from llava_ft.model.llm import load_llm  # noqa: E402
from llava_ft.testing.tiny_llm import write_tiny_internlm2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fact(setting: Setting, qtype: str, answer: str) -> str:
    """The answer stated as a sentence, as the demo's captions state it."""
    if qtype == "colour":
        return f"the shapes are {answer}."
    if qtype == "shape":
        return f"they are {setting.plurals[answer]}."
    if qtype == "count":
        return f"there is {answer} shape." if answer == setting.counts[0] else f"there are {answer} shapes."
    return f"the shape is at the {answer}."


def example(rng: random.Random, setting: Setting, n_options: tuple[int, ...]) -> tuple[str, int]:
    """(user text, index of the right option): a stated fact, then a lettered question about it."""
    qtype = rng.choice(QTYPES)
    choices = setting.choices(qtype)
    answer, n = rng.choice(choices), rng.choice(n_options)
    letter = rng.randrange(n)
    options = _options(rng, choices, answer, n, letter)
    question = mc_prompt(rng.choice(setting.questions[qtype]), options)
    return f"{fact(setting, qtype, answer)}\n{question}", letter


def train_curve(
    llm_dir: Path,
    setting: Setting,
    train: random.Random,
    test: list[tuple[str, int]],
    args: argparse.Namespace,
) -> list[tuple[int, float, float]]:
    """(step, held-out accuracy, seconds) every args.every steps."""
    tok = load_tokenizer(llm_dir)
    template = get_template("internlm2_chat")

    def prompts(texts: list[str]) -> dict[str, torch.Tensor]:
        rendered = [
            template.render(
                Conversation([Message("user", t)]),
                bos=tok.bos_token,
                eos=tok.eos_token,
                add_generation_prompt=True,
            )
            for t in texts
        ]
        return tok(rendered, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)

    letters = [tok.convert_tokens_to_ids(letter) for letter in LETTERS]
    torch.manual_seed(0)
    model = load_llm(str(llm_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    test_inputs, test_y = prompts([t for t, _ in test]), torch.tensor([y for _, y in test])
    curve, start = [], time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            model.eval()
            with torch.no_grad():
                logits = model(**test_inputs).logits[:, -1, letters]
            acc = (logits.argmax(-1) == test_y).float().mean().item()
            curve.append((step, acc, time.time() - start))
            print(f"  step {step:5d}  held-out accuracy {acc:.3f}  {time.time() - start:6.0f}s", flush=True)
            model.train()
        if step == args.steps:
            break
        batch = [example(train, setting, (2, 3, 4, 4)) for _ in range(args.batch_size)]
        # The letter scored over the whole vocabulary, as the finetune's loss scores an answer token.
        logits = model(**prompts([t for t, _ in batch])).logits[:, -1]
        target = torch.tensor([letters[y] for _, y in batch])
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def first(curve: list[tuple[int, float, float]], level: float, batch_size: int) -> str:
    """When the held-out accuracy first reached `level`: the step, the examples seen, the seconds."""
    hit = next(((s, t) for s, a, t in curve if a >= level), None)
    return "not reached" if hit is None else f"step {hit[0]} ({hit[0] * batch_size} examples, {hit[1]:.0f}s)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rope-bases", default="1e6,1e4", help="comma-separated RoPE bases, one run each")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    os.chdir(ROOT)
    prepare("data/demo")
    tokenizer = Path("data/demo/models/tokenizer/tokenizer.model")
    setting = SETTINGS["default"]
    test_rng = random.Random(10**6)
    test = [example(test_rng, setting, (4,)) for _ in range(300)]
    print(
        f"threads {torch.get_num_threads()}, LLM {LLM_SHAPE}, batch {args.batch_size}, lr {args.lr} (constant)"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for base in [float(b) for b in args.rope_bases.split(",")]:
            print(f"RoPE base {base:g}", flush=True)
            llm = write_tiny_internlm2(
                Path(tmp) / f"llm_{base:g}", tokenizer_model=tokenizer, rope_theta=base, **LLM_SHAPE
            )
            results[base] = train_curve(llm, setting, random.Random(0), test, args)
    print("\n| RoPE base | 0.5 held-out | 0.9 held-out | last |\n| --- | --- | --- | ---: |")
    for base, curve in results.items():
        reached = [first(curve, level, args.batch_size) for level in (0.5, 0.9)]
        print(f"| {base:g} | {reached[0]} | {reached[1]} | {curve[-1][1]:.3f} |")


if __name__ == "__main__":
    main()
