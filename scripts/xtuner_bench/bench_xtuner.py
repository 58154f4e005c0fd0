# ruff: noqa: B023, E741  (each closure is timed at once, inside its loop)
"""Per-core benchmark of XTuner's own data-preparation (text) pipeline.

Runs inside the .cache/xtb venv (scripts/setup_xtuner_bench.sh); imports xtuner from there at run time (no XTuner code is
copied here). Everything runs in ONE process, datasets num_proc=1, so figures are per core.
Only the processing is timed: imports, tokenizer loading, JSON reading and (reported
separately) building the Arrow table are outside the timed region.

Stages timed (per tokenizer, median of --runs):

  llava/loop      XTuner's functions called record by record in a Python loop, exactly in
                  process_hf_dataset's order: llava_map_fn -> template_map_fn(internlm2_chat)
                  -> drop empty conversations -> encode_fn(max_length, input_ids_with_output=True,
                  with_image_token=True) -> drop records without a trained label -> length.
                  = XTuner's per-record cost without HF datasets/Arrow overhead.
  llava/hf        xtuner.dataset.process_hf_dataset(...) with the arguments LLaVADataset passes
                  (pack_to_max_length=False, remove_unused_columns=False, with_image_token=True)
                  but map_num_proc=1 (LLaVADataset leaves it at the default 32 processes).
                  = what an XTuner user actually runs, per core.
  sft/loop        openai_map_fn -> template_map_fn -> encode_fn on the OpenAI-format records.
  sft/hf          process_hf_dataset as XTuner's custom-SFT configs call it
                  (dataset_map_fn=openai_map_fn, remove_unused_columns=True,
                  pack_to_max_length=True, shuffle_before_pack=True, use_varlen_attn=False).
  sft_xtfmt/hf    the same, on the XTuner conversation-format copy (dataset_map_fn=None).
  pack/*          XTuner's packing alone on the already-tokenized SFT records:
                  pack_dataset(...) (shuffle + flatten_indices + Packer map) with the default
                  settings, without shuffle, with use_varlen_attn=True, and the bare Packer
                  called on 1000-record Python batches (datasets' default batch size).

Usage:
  python bench_xtuner.py --data .cache/xtb/data --tok-root .cache/xtb --n 20000 --runs 3 \
      --tokenizers sp,bpe --json-out results.json
"""

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xtb_common  # noqa: E402

ALL_STAGES = [
    "llava/loop",
    "llava/hf",
    "llava/hf_pool1",
    "sft/loop",
    "sft/hf",
    "sft/hf_pool1",
    "sft_xtfmt/hf",
    "pack/default",
    "pack/noshuffle",
    "pack/varlen",
    "pack/packer_only",
]
DEFAULT_STAGES = [s for s in ALL_STAGES if not s.endswith("_pool1")]


def _cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn):
    """wall seconds and CPU seconds (this process + reaped child processes) of fn()."""
    gc.collect()
    c0, t0 = _cpu(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _cpu() - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=".cache/xtb/data")
    ap.add_argument("--tok-root", default=".cache/xtb")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--tokenizers", default="sp,bpe")
    ap.add_argument(
        "--stages", default=",".join(DEFAULT_STAGES), help="comma list from: " + ",".join(ALL_STAGES)
    )
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--show", type=int, default=0, help="index of the LLaVA record to print")
    a = ap.parse_args()
    stages = a.stages.split(",")

    X = xtb_common.import_xtuner()
    import datasets
    import numpy as np
    import torch
    import transformers
    from datasets import Dataset as HFDataset
    from datasets import DatasetDict

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()

    env = {
        "python": sys.version.split()[0],
        "xtuner": X["xtuner"].__version__,
        "transformers": transformers.__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "datasets": datasets.__version__,
        "pyarrow": __import__("pyarrow").__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "mmengine": __import__("mmengine").__version__,
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "torchvision_shim": X["shim"],
    }
    print("env:", json.dumps(env))

    tmpl = X["template_map_fn_factory"](template=X["PROMPT_TEMPLATE"].internlm2_chat)
    encode_fn, llava_map_fn, openai_map_fn = X["encode_fn"], X["llava_map_fn"], X["openai_map_fn"]
    process_hf_dataset, pack_dataset, Packer = X["process_hf_dataset"], X["pack_dataset"], X["Packer"]
    ML = a.max_length

    # raw JSON text is read once (not timed); each run re-parses it (not timed) because
    # llava_map_fn / template_map_fn mutate the records in place.
    raw = {}
    for key, fname in [
        ("llava", f"llava_{a.n}.json"),
        ("sft", f"sft_openai_{a.n}.json"),
        ("sft_xtfmt", f"sft_xtuner_{a.n}.json"),
    ]:
        with open(os.path.join(a.data, fname), encoding="utf-8") as f:
            raw[key] = f.read()
    N = {k: len(json.loads(v)) for k, v in raw.items()}

    def loop_pipeline(records, tok, map_fn, with_image_token):
        out = []
        for rec in records:
            ex = dict(rec)
            if map_fn is not None:
                ex.update(map_fn(ex))
            ex.update(tmpl(ex))
            if len(ex["conversation"]) == 0:
                continue
            ex.update(
                encode_fn(
                    ex,
                    tokenizer=tok,
                    max_length=ML,
                    input_ids_with_output=True,
                    with_image_token=with_image_token,
                )
            )
            if not any(lab >= 0 for lab in ex["labels"]):
                continue
            ex["length"] = len(ex["input_ids"])
            out.append(ex)
        return out

    def arrow(key):
        recs = json.loads(raw[key])
        return timed(lambda: DatasetDict({"train": HFDataset.from_list(recs)}))

    results = {
        "env": env,
        "n": a.n,
        "max_length": ML,
        "template": "internlm2_chat",
        "runs": a.runs,
        "stages": {},
    }

    def record(tk, stage, times, cpus, n_in, n_out, tokens, extra=None):
        med = statistics.median(times)
        r = {
            "times_s": [round(t, 4) for t in times],
            "cpu_s": [round(c, 4) for c in cpus],
            "median_s": round(med, 4),
            "records_in": n_in,
            "records_out": n_out,
            "tokens": tokens,
            "records_per_s": round(n_in / med, 1),
            "tokens_per_s": round(tokens / med, 1),
        }
        if extra:
            r.update(extra)
        results["stages"][f"{tk}:{stage}"] = r
        print(
            f"  {tk:8s} {stage:18s} median {med:8.3f}s  runs {[round(t, 3) for t in times]}"
            f"  cpu {[round(c, 3) for c in cpus]}  {r['records_per_s']:>10.1f} rec/s"
            f"  {r['tokens_per_s']:>12.1f} tok/s  (in {n_in}, out {n_out}, tokens {tokens})",
            flush=True,
        )

    for tk in a.tokenizers.split(","):
        tok = xtb_common.load_tokenizer(tk, a.tok_root)
        print(
            f"\n== tokenizer {tk}: {type(tok).__name__}, {len(tok)} tokens, "
            f"bos={tok.bos_token_id} eos={tok.eos_token_id} "
            f"<|im_end|>={tok.convert_tokens_to_ids('<|im_end|>')}",
            flush=True,
        )
        ref = {}

        # ---------------- LLaVA text pipeline ----------------
        if "llava/loop" in stages:
            ts, cs = [], []
            for _ in range(a.runs):
                recs = json.loads(raw["llava"])
                out, t, c = timed(lambda: loop_pipeline(recs, tok, llava_map_fn, True))
                ts.append(t), cs.append(c)
            ref["llava/loop"] = out
            record(tk, "llava/loop", ts, cs, N["llava"], len(out), sum(len(e["input_ids"]) for e in out))

        # map_num_proc=None: every datasets map/filter runs in this process (what num_proc=1
        # meant in datasets<4). map_num_proc=1 ("_pool1"): datasets 5.x then runs each
        # map/filter in a 1-worker multiprocess pool (pickling the data and tokenizer across).
        for stage, nproc in [("llava/hf", None), ("llava/hf_pool1", 1)]:
            if stage not in stages:
                continue
            ts, cs, at = [], [], []
            for _ in range(a.runs):
                ds, t_arrow, _c = arrow("llava")
                at.append(t_arrow)
                np.random.seed(0)
                out, t, c = timed(
                    lambda: process_hf_dataset(
                        dataset=ds,
                        tokenizer=tok,
                        max_length=ML,
                        dataset_map_fn=llava_map_fn,
                        template_map_fn=tmpl,
                        split="train",
                        max_dataset_length=None,
                        remove_unused_columns=False,
                        pack_to_max_length=False,
                        with_image_token=True,
                        map_num_proc=nproc,
                    )
                )
                ts.append(t), cs.append(c)
            ref[stage] = out
            record(
                tk,
                stage,
                ts,
                cs,
                N["llava"],
                len(out),
                int(sum(out.length)),
                {"arrow_build_s_median": round(statistics.median(at), 4), "map_num_proc": nproc},
            )

        # ---------------- text SFT (+ packing) ----------------
        if "sft/loop" in stages:
            ts, cs = [], []
            for _ in range(a.runs):
                recs = json.loads(raw["sft"])
                out, t, c = timed(lambda: loop_pipeline(recs, tok, openai_map_fn, False))
                ts.append(t), cs.append(c)
            ref["sft/loop"] = out
            record(tk, "sft/loop", ts, cs, N["sft"], len(out), sum(len(e["input_ids"]) for e in out))

        # tokenized, unpacked SFT records exactly as process() holds them right before
        # pack_dataset (columns input_ids, labels); not timed. Its token count is the
        # "tokens" figure of the sft/hf and pack/* rows (tokens tokenized / fed to the packer).
        if any(s.startswith(("sft", "pack")) for s in stages):
            ds, _t, _c = arrow("sft")
            tok_ds = process_hf_dataset(
                dataset=ds,
                tokenizer=tok,
                max_length=ML,
                dataset_map_fn=openai_map_fn,
                template_map_fn=tmpl,
                remove_unused_columns=True,
                shuffle_before_pack=False,
                pack_to_max_length=False,
                map_num_proc=None,
            ).remove_columns(["length"])
            tok_ds = tok_ds.flatten_indices()
            n_tok = len(tok_ds)
            tokens_in = sum(len(x) for x in tok_ds["input_ids"])
            ref["pack/input"] = tok_ds

        for stage, key, map_fn, nproc in [
            ("sft/hf", "sft", openai_map_fn, None),
            ("sft/hf_pool1", "sft", openai_map_fn, 1),
            ("sft_xtfmt/hf", "sft_xtfmt", None, None),
        ]:
            if stage not in stages:
                continue
            ts, cs, at = [], [], []
            for _ in range(a.runs):
                ds, t_arrow, _c = arrow(key)
                at.append(t_arrow)
                np.random.seed(0)  # shuffle_before_pack uses numpy's global RNG
                out, t, c = timed(
                    lambda: process_hf_dataset(
                        dataset=ds,
                        tokenizer=tok,
                        max_length=ML,
                        dataset_map_fn=map_fn,
                        template_map_fn=tmpl,
                        remove_unused_columns=True,
                        shuffle_before_pack=True,
                        pack_to_max_length=True,
                        use_varlen_attn=False,
                        map_num_proc=nproc,
                    )
                )
                ts.append(t), cs.append(c)
            ref[stage] = out
            lens = list(out.length)
            record(
                tk,
                stage,
                ts,
                cs,
                N[key],
                len(out),
                tokens_in,
                {
                    "arrow_build_s_median": round(statistics.median(at), 4),
                    "map_num_proc": nproc,
                    "packed_sequences": len(out),
                    "packed_tokens": int(sum(lens)),
                    "packed_full_max_length": sum(1 for x in lens if x == ML),
                },
            )

        variants = {
            "pack/default": dict(use_varlen_attn=False, shuffle_before_pack=True),
            "pack/noshuffle": dict(use_varlen_attn=False, shuffle_before_pack=False),
            "pack/varlen": dict(use_varlen_attn=True, shuffle_before_pack=True),
        }
        for stage, kw in variants.items():
            if stage not in stages:
                continue
            ts, cs = [], []
            for _ in range(a.runs):
                np.random.seed(0)
                out, t, c = timed(lambda: pack_dataset(tok_ds, ML, map_num_proc=None, **kw))
                ts.append(t), cs.append(c)
            ref[stage] = out
            record(
                tk,
                stage,
                ts,
                cs,
                n_tok,
                len(out),
                tokens_in,
                {"packed_sequences": len(out), "packed_tokens": sum(len(r) for r in out["input_ids"])},
            )
        if "pack/packer_only" in stages:
            cols = {"input_ids": tok_ds["input_ids"], "labels": tok_ds["labels"]}

            def packer_only():
                p, res = Packer(ML, use_varlen_attn=False), {"input_ids": [], "labels": []}
                for i in range(0, n_tok, 1000):
                    r = p({k: v[i : i + 1000] for k, v in cols.items()})
                    res["input_ids"] += r["input_ids"]
                    res["labels"] += r["labels"]
                return res

            ts, cs = [], []
            for _ in range(a.runs):
                out, t, c = timed(packer_only)
                ts.append(t), cs.append(c)
            ref["pack/packer_only"] = out
            record(
                tk,
                "pack/packer_only",
                ts,
                cs,
                n_tok,
                len(out["input_ids"]),
                tokens_in,
                {
                    "packed_sequences": len(out["input_ids"]),
                    "packed_tokens": sum(len(r) for r in out["input_ids"]),
                },
            )

        # ---------------- checks that the work was real ----------------
        checks = verify(tk, tok, ref, X, ML)
        results["stages"][f"{tk}:checks"] = checks
        src = ref.get("llava/hf") or ref.get("llava/hf_pool1") or ref.get("llava/loop")
        if src is not None:
            ex = src[a.show]
            print(
                f"\n-- {tk}: LLaVA record {a.show} (id {ex['id']}, image {ex['image']}), "
                f"{len(ex['input_ids'])} tokens, "
                f"{sum(1 for l in ex['labels'] if l != X['IGNORE_INDEX'])} with loss --"
            )
            print(
                xtb_common.render(
                    tok, ex["input_ids"], ex["labels"], X["IMAGE_TOKEN_INDEX"], X["IGNORE_INDEX"]
                )
            )
            print(f"-- first 40 input_ids: {ex['input_ids'][:40]}")
            print(f"-- first 40 labels   : {ex['labels'][:40]}")
        del ref

    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {a.json_out}")


def verify(tk, tok, ref, X, ML):
    """Cross-checks between independent paths; raises on mismatch."""
    from collections import Counter

    IGN, IMG = X["IGNORE_INDEX"], X["IMAGE_TOKEN_INDEX"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    c = {}

    def cols(x):
        if isinstance(x, list):
            return [e["input_ids"] for e in x], [e["labels"] for e in x]
        return x["input_ids"], x["labels"]

    def same(k1, k2, what):
        if k1 in ref and k2 in ref:
            i1, l1 = cols(ref[k1])
            i2, l2 = cols(ref[k2])
            assert i1 == i2 and l1 == l2, f"{what}: {k1} and {k2} outputs differ"
            c[f"{k1} == {k2}"] = True

    same("llava/loop", "llava/hf", "llava")
    same("llava/hf", "llava/hf_pool1", "llava")
    same("sft/loop", "pack/input", "sft tokenization")
    same("sft/hf", "sft_xtfmt/hf", "openai-format vs xtuner-format SFT")
    same("sft/hf", "sft/hf_pool1", "sft")
    same("sft/hf", "pack/default", "tokenize+pack vs pack of pre-tokenized")
    same("pack/noshuffle", "pack/packer_only", "pack_dataset vs bare Packer")

    for k in ("llava/hf", "llava/loop", "llava/hf_pool1"):
        if k in ref:
            ids, labs = cols(ref[k])
            assert all(r.count(IMG) == 1 for r in ids), "every LLaVA record has one image token"
            assert all(r[0] == tok.bos_token_id for r in ids)
            assert all(len(a) == len(b) <= ML for a, b in zip(ids, labs))
            assert all(any(x == im_end for x in b) for b in labs), "<|im_end|> is trained"
            assert all(b[i] in (IGN, a[i]) for a, b in zip(ids, labs) for i in range(len(a)))
            c["llava_records"] = len(ids)
            c["llava_tokens_per_record_mean"] = round(sum(map(len, ids)) / len(ids), 1)
            c["llava_truncated_to_max_length"] = sum(1 for r in ids if len(r) == ML)
            c["llava_trained_token_fraction"] = round(
                sum(sum(1 for x in b if x != IGN) for b in labs) / sum(len(b) for b in labs), 4
            )
            break

    if "pack/input" in ref:
        tin = ref["pack/input"]
        flat_ids = [t for r in tin["input_ids"] for t in r]
        flat_lab = [t for r in tin["labels"] for t in r]
        cnt = Counter(flat_ids)
        c["sft_tokens_per_record_mean"] = round(len(flat_ids) / len(tin), 1)
        for k in (
            "pack/noshuffle",
            "pack/packer_only",
            "pack/default",
            "pack/varlen",
            "sft/hf",
            "sft_xtfmt/hf",
            "sft/hf_pool1",
        ):
            if k not in ref:
                continue
            pi, pl = cols(ref[k])
            assert all(len(r) == ML for r in pi[:-1]) and 0 < len(pi[-1]) <= ML
            total = sum(len(r) for r in pi)
            dropped = len(flat_ids) - total
            # XTuner's Packer keeps the residual (< max_length tokens) of the last batch and
            # never emits it: the packed stream is the input stream minus that tail.
            assert 0 <= dropped < ML, f"{k}: {dropped} tokens missing"
            if k in ("pack/noshuffle", "pack/packer_only"):
                assert [t for r in pi for t in r] == flat_ids[:total], f"{k}: not a prefix"
                assert [t for r in pl for t in r] == flat_lab[:total]
                c[f"{k}: packed stream == input stream minus tail"] = True
            else:
                assert not (Counter(t for r in pi for t in r) - cnt), f"{k}: foreign tokens"
                c[f"{k}: packed tokens within shuffled input"] = True
            c[f"{k}: dropped tail tokens"] = dropped
        if "pack/varlen" in ref:
            v = ref["pack/varlen"]
            assert all(cl[0] == 0 and cl[-1] == len(r) for cl, r in zip(v["cumulative_len"], v["input_ids"]))
            assert all(len(p) == len(r) for p, r in zip(v["position_ids"], v["input_ids"]))
            assert v["input_ids"] == ref["pack/default"]["input_ids"] if "pack/default" in ref else True
            c["pack/varlen: cumulative_len/position_ids consistent"] = True
    print(f"  {tk:8s} checks: {json.dumps(c)}", flush=True)
    return c


if __name__ == "__main__":
    main()
