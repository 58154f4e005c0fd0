"""Data preparation: llava_ft vs XTuner 0.2.0, side by side on the same files and tokenizer folders.

Uses what scripts/setup_xtuner_bench.sh builds under ROOT (default .cache/xtb): records in ROOT/data,
tokenizers ROOT/tok_sp and ROOT/tok_bpe, XTuner's venv ROOT/venv (its columns are left out when missing).
"internlm2" is tok_sp's model loaded as llava_ft loads InternLM2's tokenizer (plain sentencepiece), beside
XTuner's sp figures.
Per tokenizer, XTuner's own benchmark runs first (its llava/loop, llava/hf, sft/loop, sft/hf stages), then
llava_ft's `prepare` in a fresh process on the same files. One process, TOKENIZERS_PARALLELISM=false.

llava_ft's time covers the whole preparation: reading and parsing the JSON, records -> conversations, template,
tokenization and labels, writing Arrow (cache off); XTuner's excludes JSON reading. Tokens are counted as XTuner
counts them (text tokens, an image as one token), and llava_ft runs with max_length 2048 + 575 because its
max_length includes the 576 image tokens while XTuner's excludes them, so both keep the same records.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_prepare.py [--root .cache/xtb] [--n 20000] [--runs 1]
        [--scale 200000] [--packing-json a.json b.json] [--json-out prep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data import prepare as prep
from llava_ft.data.prepare import compact_tokens, prepare
from llava_ft.data.sources import read_conversations
from llava_ft.data.sp_convert import fast_twin
from llava_ft.data.templates import get_template
from llava_ft.data.tokenize import Encoder
from llava_ft.data.tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent
XTB_SCRIPTS = HERE / "xtuner_bench"  # run in XTuner's venv (gen_llava.py: any Python)
DEFAULT_ROOT = HERE.parent / ".cache" / "xtb"
FILES = {"llava": "llava_{n}.json", "sft": "sft_openai_{n}.json"}
XTUNER_STAGES = "llava/loop,llava/hf,sft/loop,sft/hf"
IMAGE_TOKENS = 576
MAX_LENGTH = 2048 + IMAGE_TOKENS - 1


def measure_ours(args: argparse.Namespace) -> dict:
    """Runs in a fresh process (--ours TOKENIZER): records/s per format, 2 processes, cold vs warm."""

    tok = load_tokenizer(tokenizer_folder(args.root, args.ours))
    encoder = Encoder(
        tok, get_template("internlm2_chat", tok), max_length=MAX_LENGTH, image_tokens=IMAGE_TOKENS
    )
    out: dict = {"tokenizer": type(tok).__name__}
    data = Path(args.root) / "data"
    outputs = {}
    for kind, name in FILES.items():
        path = data / name.format(n=args.n)
        times = []
        for _ in range(args.runs):
            done = prepare(path, encoder, use_cache=False)
            times.append(done.seconds)
        outputs[kind] = done.dataset
        med = statistics.median(times)
        out[kind] = {"records": done.stats.records, "kept": done.stats.kept, "seconds": med,
                     "records_per_s": done.stats.records / med, "tokens_per_s": compact_tokens(done.dataset) / med}  # fmt: skip
    for kind, name in FILES.items():
        out[kind]["tokenizer_alone_per_s"] = tokenizer_alone(encoder, data / name.format(n=args.n), args.runs)
        out[kind]["unchunked_per_s"] = unchunked(encoder, data / name.format(n=args.n), args.runs)
    load = os.getloadavg()[0]
    # One process then two, back to back (this machine's speed drifts between minutes), `pair_runs` times.
    one_s, two_s = [], []
    for _ in range(args.pair_runs):
        one_s.append(prepare(data / FILES["llava"].format(n=args.n), encoder, use_cache=False).seconds)
        done = prepare(data / FILES["llava"].format(n=args.n), encoder, use_cache=False, num_proc=2)
        two_s.append(done.seconds)
    out["llava_np2"] = {
        "seconds": statistics.median(two_s),
        "records_per_s": done.stats.records / statistics.median(two_s),
        "one_process_per_s": done.stats.records / statistics.median(one_s),
        "pair_ratios": [one / two for one, two in zip(one_s, two_s)],
        "identical": done.dataset.data.equals(outputs["llava"].data),
        "load": load,
    }
    with tempfile.TemporaryDirectory() as cache:
        cold = prepare(data / FILES["llava"].format(n=args.n), encoder, cache_dir=cache)
        warm = prepare(data / FILES["llava"].format(n=args.n), encoder, cache_dir=cache)
        assert (cold.cache, warm.cache) == ("built", "hit"), (cold.cache, warm.cache)
        out["cold_s"], out["warm_s"] = cold.seconds, warm.seconds
    return out


def tokenizer_alone(encoder, path: Path, runs: int) -> dict[str, float]:
    """Records/s of the tokenizer's Rust call alone on every record's whole text, in prepare's batches: what
    preparation that hands each text to the tokenizer pays at the least (XTuner does). With offsets
    (`encode_batch`, what a label check over the whole text reads) and without (`encode_batch_fast`, ids only).
    llava_ft's chunked tokenization (llava_ft/data/chunked.py) gets the same ids without this call."""

    convs, _ = read_conversations(path)
    texts = [[c for c in encoder.render(conv)[1].split(IMAGE_TOKEN) if c] for conv in convs]
    batches = [[t for ts in texts[i : i + 256] for t in ts] for i in range(0, len(texts), 256)]
    tok = encoder.tokenizer
    # Plain sentencepiece: the call of its fast twin, which preparation uses.
    backend = (tok if tok.is_fast else fast_twin(tok)).backend_tokenizer
    out = {}
    for name, call in (("offsets", backend.encode_batch), ("no_offsets", backend.encode_batch_fast)):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            for batch in batches:
                call(batch, add_special_tokens=False)
            times.append(time.perf_counter() - start)
        out[name] = len(convs) / statistics.median(times)
    return out


def unchunked(encoder, path: Path, runs: int) -> float:
    """Records/s of `prepare` with chunked tokenization off (one Rust call per batch of texts instead): what
    keeping llava_ft/data/chunked.py is weighed by."""

    with mock.patch.object(prep.ChunkedTokenizer, "of", return_value=None):
        done = [prep.prepare(path, encoder, use_cache=False) for _ in range(runs)]
    return done[0].stats.records / statistics.median(d.seconds for d in done)


def tokenizer_folder(root: str, tk: str) -> Path:
    """ROOT/tok_sp or ROOT/tok_bpe; "internlm2": tok_sp's sentencepiece model in a folder that llava_ft loads
    as InternLM2's own tokenizer (plain sentencepiece, as upstream's slow tokenizer), made on first use."""
    if tk != "internlm2":
        return Path(root) / f"tok_{tk}"
    folder = Path(root) / "tok_internlm2"
    if not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(exist_ok=True)
        (folder / "tokenizer.model").write_bytes((Path(root) / "tok_sp" / "tokenizer.model").read_bytes())
        config = json.loads((Path(root) / "tok_sp" / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "InternLM2Tokenizer"
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def run_xtuner(args: argparse.Namespace, tk: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            [f"{args.root}/venv/bin/python", str(XTB_SCRIPTS / "bench_xtuner.py"), "--data", f"{args.root}/data",
             "--tok-root", args.root, "--n", str(args.n), "--runs", str(args.runs), "--tokenizers", tk,
             "--stages", XTUNER_STAGES, "--json-out", f.name],
            check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )  # fmt: skip
        stages = json.loads(Path(f.name).read_text())["stages"]
    return {stage: stages[f"{tk}:{stage}"] for stage in XTUNER_STAGES.split(",")}


def run_ours(args: argparse.Namespace, tk: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--ours",
        tk,
        "--root",
        args.root,
        "--n",
        str(args.n),
        "--runs",
        str(args.runs),
        "--pair-runs",
        str(args.pair_runs),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_scale(args: argparse.Namespace) -> dict:
    """The CLI on --scale generated LLaVA records in a child process: its wall time and peak RSS."""
    data = Path(args.root) / "scale"
    path = data / f"llava_{args.scale}.json"
    if not path.exists():
        gen = XTB_SCRIPTS / "gen_llava.py"
        subprocess.run([sys.executable, str(gen), "--n", str(args.scale), "--out", str(data)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        for other in ("sft_xtuner", "sft_openai"):
            (data / f"{other}_{args.scale}.json").unlink()
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "llava_ft.cli.data", "prepare", "--data", str(path), "--template",
               "internlm2_chat", "--tokenizer", f"{args.root}/tok_bpe", "--max-length", str(MAX_LENGTH),
               "--num-proc", "1", "--output", cache]  # fmt: skip
        start = time.perf_counter()
        # Through a wrapper process, so that the peak RSS is the CLI's alone (not the generator's).
        res = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], check=True, capture_output=True, text=True,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})  # fmt: skip
        wall = time.perf_counter() - start
    lines = res.stdout.strip().splitlines()
    return {
        "records": args.scale,
        "wall_s": wall,
        "peak_rss_mib": json.loads(lines[-1])["peak_rss_kib"] / 1024,
        "last_line": lines[-2],
    }


RSS_WRAPPER = """import json, resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"""


def table(results: dict, packing: list[dict]) -> str:
    lines = ["| measure | tokenizer | XTuner 0.2.0 | llava_ft | ratio |", "|---|---|---:|---:|---:|"]
    for tk, r in results["tokenizers"].items():
        ours, xt = r["ours"], r.get("xtuner")
        for kind, stages in (("llava", ("llava/loop", "llava/hf")), ("sft", ("sft/loop", "sft/hf"))):
            mine = ours[kind]["records_per_s"]
            for stage in stages:
                theirs = xt[stage]["records_per_s"] if xt else None
                ratio = f"{mine / theirs:.2f}x" if theirs else "-"
                theirs_s = f"{theirs:,.0f}" if theirs else "no XTuner venv"
                lines.append(
                    f"| records/s, {kind} vs XTuner {stage} | {tk} | {theirs_s} | {mine:,.0f} | {ratio} |"
                )
            lines.append(f"| tokens/s, {kind} (image = 1 token) | {tk} | "
                         f"{xt[stages[0]]['tokens_per_s']:,.0f} | {ours[kind]['tokens_per_s']:,.0f} | "
                         f"{ours[kind]['tokens_per_s'] / xt[stages[0]]['tokens_per_s']:.2f}x |" if xt else
                         f"| tokens/s, {kind} | {tk} | - | {ours[kind]['tokens_per_s']:,.0f} | - |")  # fmt: skip
            if xt:
                base = xt[stages[0]]["records_per_s"]
                plain = ours[kind]["unchunked_per_s"]
                lines.append(f"| records/s, {kind}, chunked tokenization off vs XTuner {stages[0]} | {tk} | "
                             f"{base:,.0f} | {plain:,.0f} | {plain / base:.2f}x |")  # fmt: skip
                for what, label in (("offsets", "with offsets"), ("no_offsets", "ids only, no offsets")):
                    ceiling = ours[kind]["tokenizer_alone_per_s"][what]
                    lines.append(f"| records/s, {kind}, the Rust tokenizer call alone {label} vs XTuner "
                                 f"{stages[0]} | {tk} | {base:,.0f} | {ceiling:,.0f} | {ceiling / base:.2f}x |")  # fmt: skip
        np2 = ours["llava_np2"]
        pairs = np2["pair_ratios"]
        lines.append(f"| records/s, llava, --num-proc 2 vs 1 run just before it, medians of {len(pairs)} pairs (pairs "
                     f"{min(pairs):.2f}-{max(pairs):.2f}x; output identical: {np2['identical']}; load {np2['load']:.1f}) "
                     f"| {tk} | | {np2['one_process_per_s']:,.0f} -> {np2['records_per_s']:,.0f} | "
                     f"{np2['records_per_s'] / np2['one_process_per_s']:.2f}x |")  # fmt: skip
        lines.append(f"| start-up on {results['n']:,} llava records, cold vs warm cache (s) | {tk} | | "
                     f"{ours['cold_s']:.2f} / {ours['warm_s']:.3f} | {ours['cold_s'] / ours['warm_s']:.0f}x |")  # fmt: skip
    if "scale" in results:
        s = results["scale"]
        lines.append(f"| prepare {s['records']:,} llava records (CLI, bpe): wall s, peak RSS MiB | bpe | | "
                     f"{s['wall_s']:.0f} s, {s['peak_rss_mib']:,.0f} MiB | |")  # fmt: skip
    for p in packing:
        base = p["results"]["padded"]["real_tokens_per_s"]
        for mode, r in p["results"].items():
            # What dropping the padding alone would give (padded slots / real tokens), attention aside.
            bound = f", pad-free bound {1 / (1 - r['timed_pad_share']):.2f}x" if mode == "padded" else ""
            lines.append(f"| training tokens/s, {p['mix']}: {mode}, {r['attention']} (pad {r['timed_pad_share']:.1%}"
                         f"{bound}, peak RSS {r['peak_rss_mib']:,.0f} MiB) | tiny model | | "
                         f"{r['real_tokens_per_s']:,.0f} | {r['real_tokens_per_s'] / base:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--tokenizers", default="sp,bpe,internlm2")
    parser.add_argument(
        "--pair-runs", type=int, default=3, help="one-then-two-process pairs for --num-proc 2 (medians)"
    )
    parser.add_argument("--scale", type=int, default=0, help="also prepare this many generated LLaVA records")
    parser.add_argument("--packing-json", nargs="*", default=[], help="bench_packing.py --json-out files")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours:
        print(json.dumps(measure_ours(args)))
        return
    if not (Path(args.root) / "data").is_dir():
        sys.exit(
            f"no records under {args.root}/data: run `bash scripts/setup_xtuner_bench.sh {args.root}` first"
        )
    have_xtuner = (
        Path(f"{args.root}/venv/bin/python").exists() and (XTB_SCRIPTS / "bench_xtuner.py").is_file()
    )
    if not have_xtuner:
        print(
            f"XTuner columns left out: set its venv up with `bash scripts/setup_xtuner_bench.sh {args.root}`"
        )
    results: dict = {"n": args.n, "runs": args.runs, "tokenizers": {}, "load_start": os.getloadavg()[0]}
    for tk in args.tokenizers.split(","):
        # internlm2 is tok_sp's model file: XTuner's side is its sp run (it loads that folder as a fast tokenizer).
        theirs = "sp" if tk == "internlm2" else tk
        done = results["tokenizers"].get(theirs, {}).get("xtuner")
        xt = done or (run_xtuner(args, theirs) if have_xtuner else None)
        results["tokenizers"][tk] = {"xtuner": xt, "ours": run_ours(args, tk)}
    if args.scale:
        if scale := run_scale(args):
            results["scale"] = scale
    packing = [json.loads(Path(p).read_text()) for p in args.packing_json]
    results["packing"] = packing
    results["load_end"] = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python "
          f"{platform.python_version()}; 1-minute load {results['load_start']:.1f} at start, "
          f"{results['load_end']:.1f} at end")  # fmt: skip
    print(table(results, packing))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
