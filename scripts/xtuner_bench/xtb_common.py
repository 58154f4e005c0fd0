"""Shared helpers for the XTuner baseline scripts (run inside the .cache/xtb venv (scripts/setup_xtuner_bench.sh)).

Nothing here re-implements XTuner: the pipeline functions are imported from the installed
xtuner package at run time (see import_xtuner()).
"""

import importlib.util
import os
import pathlib

_TV_LIB = None  # keeps the placeholder op library alive for the life of the process


def torchvision_shim():
    """Make `import torchvision` work with torch 2.13.0+cpu.

    The only torchvision that pip can get here for torch 2.13.0 is the PyPI build
    (0.28.0+cu130), whose compiled ops need libc10_cuda.so, which the CPU torch wheel lacks.
    torchvision then fails at import time with "operator torchvision::nms does not exist"
    (its __init__ registers fake kernels for nms/qnms unconditionally). xtuner.dataset imports
    torchvision.transforms (internvl_dataset.py), and transformers' image utils import
    torchvision too, so without this the XTuner text pipeline cannot even be imported.

    If (and only if) torchvision's ops library fails to load, this defines the two op schemas
    that torchvision's import needs. No torchvision op is ever called by the text pipeline;
    nothing about tokenisation, templating or packing is touched.
    """
    global _TV_LIB
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "torchvision not installed"
    import torch

    d = spec.submodule_search_locations[0]
    so = [f for f in os.listdir(d) if f.startswith("_C") and f.endswith(".so")]
    if not so:
        return "torchvision has no _C library"
    try:
        torch.ops.load_library(os.path.join(d, so[0]))
        return "torchvision ops load natively (no shim needed)"
    except OSError as e:
        why = str(e.__cause__ or e)
    _TV_LIB = torch.library.Library("torchvision", "DEF")
    _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return f"torchvision ops unavailable ({why}); placeholder nms/qnms schemas defined"


def import_xtuner():
    """Import exactly the XTuner objects that its process_hf_dataset / LLaVADataset use."""
    shim = torchvision_shim()
    import xtuner
    from xtuner.dataset.huggingface import pack_dataset, process_hf_dataset
    from xtuner.dataset.map_fns import llava_map_fn, openai_map_fn, template_map_fn_factory
    from xtuner.dataset.utils import Packer, encode_fn
    from xtuner.utils import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX, PROMPT_TEMPLATE

    return dict(
        xtuner=xtuner,
        shim=shim,
        process_hf_dataset=process_hf_dataset,
        pack_dataset=pack_dataset,
        llava_map_fn=llava_map_fn,
        openai_map_fn=openai_map_fn,
        template_map_fn_factory=template_map_fn_factory,
        encode_fn=encode_fn,
        Packer=Packer,
        PROMPT_TEMPLATE=PROMPT_TEMPLATE,
        DEFAULT_IMAGE_TOKEN=DEFAULT_IMAGE_TOKEN,
        IGNORE_INDEX=IGNORE_INDEX,
        IMAGE_TOKEN_INDEX=IMAGE_TOKEN_INDEX,
    )


def load_tokenizer(kind, tok_root):
    """sp / bpe: loaded the way XTuner configs do it
      tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=...,
                       trust_remote_code=True, padding_side='right')
    -> LlamaTokenizerFast (converted from tokenizer.model at load) / PreTrainedTokenizerFast.
    sp_slow: the slow SentencePiece LlamaTokenizer from the same folder (what a
    use_fast=False config, or a folder without a fast tokenizer, would give)."""
    from transformers import AutoTokenizer, LlamaTokenizer

    tok_root = pathlib.Path(tok_root)
    if kind == "sp":
        return AutoTokenizer.from_pretrained(
            str(tok_root / "tok_sp"), trust_remote_code=True, padding_side="right"
        )
    if kind == "bpe":
        return AutoTokenizer.from_pretrained(
            str(tok_root / "tok_bpe"), trust_remote_code=True, padding_side="right"
        )
    if kind == "sp_slow":
        return LlamaTokenizer.from_pretrained(str(tok_root / "tok_sp"), padding_side="right")
    raise ValueError(kind)


def render(tok, input_ids, labels, image_token_index=-200, ignore_index=-100):
    """Human-readable view of one encoded record: runs of masked (-100) and trained tokens."""
    segs, cur, cur_masked = [], [], None

    def flush():
        if not cur:
            return
        parts, buf = [], []
        for t in cur:
            if t == image_token_index:
                if buf:
                    parts.append(tok.decode(buf))
                    buf = []
                parts.append("<IMAGE_TOKEN_INDEX=-200>")
            else:
                buf.append(t)
        if buf:
            parts.append(tok.decode(buf))
        tag = f"MASKED x{len(cur)}" if cur_masked else f"LOSS x{len(cur)}"
        segs.append(f"[{tag}] " + repr("".join(parts)))

    for t, lab in zip(input_ids, labels):
        m = lab == ignore_index
        if m != cur_masked:
            flush()
            cur, cur_masked = [], m
        cur.append(t)
    flush()
    return "\n".join(segs)
