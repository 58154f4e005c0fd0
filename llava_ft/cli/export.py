"""`llava-ft export CHECKPOINT --format hf-llava|hf-llava-next|hf-llava-onevision|merged-llm --output DIR`."""

from __future__ import annotations

import argparse
import sys

from llava_ft.export_formats import check_export_format
from llava_ft.folders import (
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    add_base_path_args,
    base_overrides,
    read_stage_config,
)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="merge LoRA and write a standard transformers folder (Llava, LlavaNext, LlavaOnevision or the LLM)",
    )
    p.add_argument("checkpoint", help="a stage output folder (with llava_ft.yaml)")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="hf-llava",
        help="hf-llava: transformers' Llava + processor; hf-llava-next / hf-llava-onevision: an any-resolution "
        "model (model.vision.anyres) as LlavaNext / LlavaOnevision + processor; merged-llm: the merged LLM + "
        "tokenizer only",
    )
    p.add_argument("--output", required=True, help="folder to write (written beside it, then renamed)")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="dtype of the saved weights")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip reloading the export and comparing its tokens and logits with llava_ft's",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_base_path_args(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        # A wrong folder, or a model the format cannot express, fails before torch is imported.
        saved = read_stage_config(args.checkpoint)
        check_export_format(args.checkpoint, saved.model, args.format)
        # Imported only here: the export imports torch and transformers, seconds of start-up.
        from llava_ft.export import export_checkpoint

        result = export_checkpoint(
            args.checkpoint,
            args.output,
            fmt=args.format,
            dtype=args.dtype,
            verify=args.verify,
            overwrite=args.overwrite,
            overrides=base_overrides(args),
        )
    except (OSError, ValueError) as e:  # bad folder, unsupported model, failed check: one line, no traceback
        print(f"llava-ft export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} as {result.format} to {result.output}")
    if result.image_token_index is not None:
        print(f"  <image> token id {result.image_token_index}")
    if args.verify:
        print(
            f"  verified: max |logit diff| adapters vs merged {result.merge_max_diff:.3g}, "
            f"llava_ft vs reloaded export {result.export_max_diff:.3g}; token ids identical"
        )
    for note in result.notes:
        print(f"  {note}")
    return 0
