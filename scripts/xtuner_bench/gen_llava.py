"""Deterministic synthetic records for the XTuner data-preparation baseline.

Writes three JSON files (each a JSON list of N records) into OUT_DIR:

  llava_<N>.json       LLaVA format: {"id", "image" (relative path, need not exist),
                       "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}
                       1-4 human/gpt rounds; the first human turn starts with "<image>\\n".
  sft_xtuner_<N>.json  text-only SFT, XTuner's conversation format:
                       {"conversation": [{"system", "input", "output"}, ...]}
                       (system is "" except, for half the records, on the first turn)
  sft_openai_<N>.json  the same conversations in OpenAI messages format:
                       {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}

Every message is 5-80 words (uniform), drawn from a fixed English word list and cut into
sentences of 4-18 words, with occasional commas and small numbers. Only Python's
random.Random(seed) is used, so the bytes are identical for the same N and seed on any
CPython 3.x; the script prints each file's sha256 so runs can be checked against each other.

Usage:  python gen_llava.py --n 20000 --seed 0 --out .cache/xtb/data
"""

import argparse
import hashlib
import json
import os
import random

WORDS = """
the of and to a in is it that for on with as was this are be at by from or an have not
they which one you had but all were when we there can more if will some what about would
their out so up into them time has two like other could see then first these its now than
over also only new people way may use any how where after most made many such well back
through just year good very make our down even take life work because must still under day
same last great might house world each old another city long part place school little
between small large state number case group problem fact water image picture photo scene
person man woman child dog cat car street building tree sky cloud light color red blue green
yellow black white left right front behind near top bottom center background foreground
table chair window door wall floor road sign bus train bicycle boat plane field grass river
mountain beach snow rain food plate cup bowl pizza sandwich fruit apple banana kitchen room
bed sofa television computer phone book bag umbrella shirt hat glasses wearing holding sitting
standing walking running looking playing riding eating drinking smiling showing appears seems
visible shown several three four five many few both each around across above below next
inside outside during while before although however therefore because likely possibly clearly
probably perhaps quite rather really simply together alone bright dark wooden metal plastic
round square tall short young older busy quiet open closed empty full clean sunny cloudy
describe explain what why how where which who question answer detail details reason purpose
important different similar common typical unusual possible specific general overall main
""".split()

QUESTION_STARTS = [
    "What",
    "Why",
    "How",
    "Where",
    "Which",
    "Who",
    "Can",
    "Is",
    "Are",
    "Describe",
    "Explain",
    "Could",
]
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a careful assistant that answers questions about everyday scenes.",
    "Answer briefly and precisely.",
    "You are an expert visual analyst. Give detailed, accurate descriptions.",
]


def sentence_words(rng, n):
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.02:
            w = str(rng.randint(1, 120))
        else:
            w = rng.choice(WORDS)
        if i < n - 1 and rng.random() < 0.08:
            w += ","
        out.append(w)
    return out


def message(rng, question=False):
    """5-80 words, split into sentences of 4-18 words."""
    total = rng.randint(5, 80)
    sents, left = [], total
    while left > 0:
        k = min(left, rng.randint(4, 18))
        if left - k < 4:  # avoid a dangling 1-3 word sentence
            k = left
        ws = sentence_words(rng, k)
        if question and not sents:
            ws[0] = rng.choice(QUESTION_STARTS)
        ws[0] = ws[0][:1].upper() + ws[0][1:]
        ws[-1] = ws[-1].rstrip(",")
        end = "?" if question and rng.random() < 0.7 else "."
        sents.append(" ".join(ws) + end)
        left -= k
    return " ".join(sents)


def llava_record(rng, i):
    rounds = rng.randint(1, 4)
    conv = []
    for r in range(rounds):
        q = message(rng, question=True)
        if r == 0:
            q = "<image>\n" + q
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": message(rng)})
    img = f"{rng.choice(['coco/train2017', 'gqa/images', 'ocr_vqa/images', 'vg/VG_100K'])}/{i:012d}.jpg"
    return {"id": f"{i:012d}", "image": img, "conversations": conv}


def sft_conversation(rng):
    system = rng.choice(SYSTEMS) if rng.random() < 0.5 else ""
    rounds = rng.randint(1, 4)
    return system, [(message(rng, question=True), message(rng)) for _ in range(rounds)]


def to_xtuner(system, turns):
    return {
        "conversation": [
            {"system": system if k == 0 else "", "input": q, "output": a} for k, (q, a) in enumerate(turns)
        ]
    }


def to_openai(system, turns):
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": a})
    return {"messages": msgs}


def dump(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(recs, f, ensure_ascii=False)
    h = hashlib.sha256(open(path, "rb").read()).hexdigest()
    print(f"{os.path.basename(path)}: {len(recs)} records, {os.path.getsize(path)} bytes, sha256 {h}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".cache/xtb/data")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    rng = random.Random(a.seed)
    dump(os.path.join(a.out, f"llava_{a.n}.json"), [llava_record(rng, i) for i in range(a.n)])

    rng = random.Random(a.seed + 1)
    convs = [sft_conversation(rng) for _ in range(a.n)]
    dump(os.path.join(a.out, f"sft_xtuner_{a.n}.json"), [to_xtuner(s, t) for s, t in convs])
    dump(os.path.join(a.out, f"sft_openai_{a.n}.json"), [to_openai(s, t) for s, t in convs])


if __name__ == "__main__":
    main()
