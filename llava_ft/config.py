"""Typed run configuration: one YAML file per stage, every field documented here.

A stage (text pretraining, LLaVA pretrain, LLaVA finetune) is only a choice of these values. `load_config`
reads YAML, applies `--section.key value` overrides and validates, naming the offending key and where it came
from (the file or the override), with a "did you mean" for a misspelt one. The train section also takes the
transformers `TrainingArguments` names (see TrainSection).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class AnyresSection:
    """LLaVA-NeXT's any-resolution tiling: the image is resized to the best-fitting canvas of `grid_pinpoints`,
    cut into tower-sized tiles, and a downscaled base view comes first; features are unpadded and a learned
    newline embedding closes each row of tiles' features."""

    grid_pinpoints: list[list[int]] | None = None
    """[height, width] canvases in pixels an image may be tiled to (LLaVA-NeXT's image_grid_pinpoints); each side
    a multiple of the tower's input size. None: LLaVA-NeXT's 1x2, 2x1, 2x2, 3x1 and 1x3 tiles at the tower's
    size (336 px: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])."""
    max_tiles: int | None = None
    """Leave out canvases of more tiles than this (2x2 is 4 tiles; the base view is not counted). None: all."""
    max_image_tokens: int | None = None
    """Leave out canvases whose image can carry more tokens than this (base view, tiles and row newlines, at the
    least favourable aspect ratio), so no image exceeds it. None: no cap."""


@dataclass
class VisionSection:
    backend: Literal["open_clip", "hf"] = "open_clip"
    """Which library builds the tower: open_clip (CLIP ViTs and timm-trunk SigLIP models), or transformers
    (CLIPVisionModel or SiglipVisionModel, chosen by config.json's model_type)."""
    model: str = "ViT-L-14-336-quickgelu"
    """open_clip: a model name, or `local-dir:/path` (a folder with open_clip_config.json and weights); hf: a
    local CLIP or SigLIP folder (a vision model, or a whole CLIPModel / SiglipModel checkpoint)."""
    pretrained: str | None = None
    """open_clip with a model name only: local weights file (.safetensors/.bin/.pt) of the whole CLIP or SigLIP
    model, never a hub tag. None: random weights (tiny tests only)."""
    feature_layer: int = -2
    """Block whose output feeds the projector, indexed like transformers' hidden_states (1..L or -L..-1);
    -2, the penultimate, as LLaVA-1.5. CLS is dropped (CLIP); SigLIP has none."""
    pool: int = 1
    """Average-pool the patch grid by this factor (2: 8x8 patches -> 16 tokens). 1 keeps all patches."""
    image_aspect: Literal["pad", "resize", "crop"] | None = None
    """pad: pad to square with the mean colour (LLaVA-1.5); resize: squash to a square; crop: centre crop. None:
    the tower's own, pad for CLIP and resize for SigLIP (its published preprocessing) and for anyres."""
    anyres: AnyresSection | None = None
    """Any-resolution tiling (LLaVA-NeXT); None: one view of the tower's size per image (LLaVA-1.5). Needs pool 1;
    its base view is squashed as LLaVA-NeXT's is (image_aspect resize or null)."""


@dataclass
class ModelSection:
    llm: str = ""
    """Local folder of the language model (InternLM2 layout, or any transformers causal LM)."""
    vision: VisionSection | None = None
    """The vision tower; null for a text-only model."""
    projector: str = "mlp2x_gelu"
    """Projector kind: mlp2x_gelu, linear, or mlpNx_gelu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype. auto: bfloat16 on GPU, float32 on CPU (where bfloat16 matmuls are slow)."""
    load_in_4bit: bool | None = None
    """Quantise the LLM to NF4. None: only when trainable.llm is qlora. True also suits a frozen LLM in pretrain.
    The parts left unquantised (embeddings, lm_head, norms) stay in `dtype`: no prepare_model_for_kbit_training
    upcast to fp32, which costs memory (most at a large vocabulary) and slows the step."""
    attn_implementation: str | None = None
    """sdpa, sdpa_packed, eager, flash_attention_2, flex_attention. None: flash_attention_2 when flash-attn is
    installed and on GPU; else for packed rows flex_attention on GPU (a block-diagonal mask whose other samples'
    blocks are skipped) and sdpa_packed on CPU (attention within each sample of a row); else sdpa. The choice
    is logged."""
    loss: Literal["auto", "plain", "chunked", "fused"] = "auto"
    """How the training loss is computed. plain: the HF causal LM's own (fp32 logits over the whole vocabulary
    for every position); chunked: from the decoder's hidden states, logits only for trained
    positions, a checkpointed chunk at a time; fused: liger-kernel's fused linear cross-entropy (never builds
    logits). All give the same value. auto: fused with liger-kernel on GPU, chunked on GPU, plain on CPU;
    fused where liger cannot run warns and uses chunked."""
    loss_chunk_size: int = 1024
    """Tokens per chunk for the chunked loss (peak extra memory ~ chunk x vocab x 4 bytes x 2)."""
    liger: bool | None = None
    """liger-kernel's RMSNorm, SwiGLU and RoPE kernels in the LLM (pip install -e .[gpu]): less activation
    memory and faster steps on GPU. None: used when installed and on GPU; true where it cannot run warns and
    keeps the plain modules (same results)."""


@dataclass
class TrainableSection:
    llm: Literal["frozen", "full", "lora", "qlora"] = "frozen"
    """How the LLM trains. qlora = LoRA on a 4-bit NF4 base."""
    projector: Literal["frozen", "full"] = "full"
    """The projector is small: full or frozen."""
    vision: Literal["frozen", "full", "lora"] = "frozen"
    """The CLIP tower stays frozen, trains whole (full: embeddings, norms and every block up to the one whose
    output is used; later blocks and the pooling head never reach the loss and stay frozen), or gets LoRA
    adapters on its linear layers."""


@dataclass
class LoraSection:
    r: int = 64
    """LoRA rank for the LLM."""
    alpha: int = 16
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt; all-linear = every Linear in the LLM except the output head."""
    vision_r: int = 64
    """LoRA rank for the vision tower when trainable.vision is lora."""
    vision_alpha: int = 16
    """LoRA alpha for the vision tower."""


@dataclass
class DataSource:
    path: str = ""
    """A .json or .jsonl file."""
    format: str = "auto"
    """llava, xtuner, alpaca, openai, text, or auto (detected per file)."""
    image_folder: str | None = None
    """Folder image paths in the records are relative to (default: the data file's folder)."""


@dataclass
class DataSection:
    train: list[DataSource] = field(default_factory=list)
    """Training files; several are concatenated (e.g. LLaVA instruction data + text-only SFT)."""
    eval: list[DataSource] = field(default_factory=list)
    """Held-out files for the evaluation loss (train.eval_steps), prepared and cached as data.train is; batches
    are padded, never packed. Not with val_size."""
    val_size: int | float | None = None
    """Evaluate on samples split off data.train instead of data.eval: a count (>= 1) or a fraction (0 < x < 1)
    of its samples, drawn by train.seed (the same split on every run and process). None: no split."""
    template: str = "internlm2_chat"
    """Chat template: internlm2_chat, qwen2_chat, llama2_chat, llama3_chat, vicuna_v1, plain, tokenizer."""
    max_length: int = 2048
    """Longest sample in tokens, image tokens included. Longer ones are truncated after the last image, or dropped."""
    max_image_tokens: int | None = None
    """Most image tokens one sample may carry (all its images together); a sample over it is dropped and counted.
    None: only max_length bounds them. With model.vision.anyres one large image can carry thousands."""
    last_turn_only: bool = False
    """Train only the final assistant turn of multi-turn conversations."""
    packing: bool = False
    """Pack several samples per row of max_length tokens; positions restart per sample and attention stays within
    it. Saves the compute and memory spent on padding."""
    pack_length: int | None = None
    """Row capacity in tokens when packing (>= max_length); None: max_length. Longer rows leave less padding when
    samples are long (LLaVA's 600-1600-token image samples fill rows of 2048 poorly); with per-sample attention
    (flash-attn varlen, flex_attention, sdpa_packed) a longer row adds no attention cost."""
    group_by_length: bool = True
    """Without packing: batch samples of similar length to waste less padding."""
    skip_bad: bool = False
    """Skip (and report) malformed records instead of stopping at the first one."""
    cache: bool = True
    """Cache prepared (tokenized) data as Arrow, keyed by data, template, tokenizer, max_length and code version."""
    cache_dir: str | None = None
    """Where the prepared-data cache lives; None: ~/.cache/llava_ft/prepared."""
    num_proc: int | None = None
    """Processes that tokenize in parallel when preparing data (the output is the same for any number). None: the
    CPUs this process may use, at most 8, for files of 8 MiB and more (1 below that, where starting processes costs
    more than it saves); shared among the training processes of this machine only with the cache off, when each
    of them prepares."""


@dataclass
class EvalBenchmarkSection:
    """A benchmark file scored at the end of every epoch on the model in training, by the code of
    `llava-ft eval` (llava_ft/eval), logged as eval_<kind>_accuracy."""

    kind: Literal["mmbench", "pope", "vqa"] = "vqa"
    """Which scorer reads and scores `data` (the eval scripts' formats)."""
    data: str = ""
    """The benchmark file: an MMBench .tsv, or a POPE / VQA .jsonl."""
    images: str | None = None
    """Image folder of pope and vqa (mmbench images are inside the tsv)."""
    limit: int | None = None
    """Score only the first N items (each epoch asks them all again); None: all."""
    batch_size: int = 16
    """Questions per generation batch."""
    max_new_tokens: int = 32
    """Longest answer generated."""
    prompt_suffix: str | None = None
    """pope and vqa: appended to each question; None: the benchmark's own (LLaVA-1.5's)."""
    circular: bool = False
    """mmbench: generate the rotations of a file that has none (scored circularly)."""


@dataclass
class TrainSection:
    """Optimisation and output. transformers `TrainingArguments` names are accepted as aliases (in YAML and in
    overrides); giving both spellings of one field is an error:

    ============================  ==================
    TrainingArguments             llava_ft
    ============================  ==================
    learning_rate                 lr
    per_device_train_batch_size   batch_size
    gradient_accumulation_steps   grad_accum
    num_train_epochs              epochs
    per_device_eval_batch_size    eval_batch_size
    lr_scheduler_type             lr_scheduler
    dataloader_num_workers        dataloader_workers
    ============================  ==================

    These are spelt as in TrainingArguments already: output_dir, max_steps, weight_decay, warmup_ratio,
    max_grad_norm, optim, gradient_checkpointing, seed, logging_steps, save_steps, save_total_limit, deepspeed,
    report_to, eval_steps, eval_strategy."""

    output_dir: str = "work_dirs/run"
    """Where checkpoints, logs and the final stage output go."""
    init_from: str | None = None
    """A previous stage's output folder whose trained weights (projector, adapters, LLM) this stage starts from."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimiser steps; -1: use epochs."""
    batch_size: int = 8
    """Per-device micro batch (rows when packing)."""
    grad_accum: int = 1
    """Micro batches per optimiser step (derived when global_batch_size is set)."""
    global_batch_size: int | None = None
    """Samples per optimiser step over all processes: batch_size x grad_accum x processes. When set, grad_accum
    is derived from it and the process count (WORLD_SIZE, as torchrun sets it; 1 without it), which must divide
    it exactly; a grad_accum given as well must agree. None: grad_accum as given."""
    lr: float = 2e-4
    """Peak learning rate (LLM / LoRA parameters, and everything without its own rate)."""
    projector_lr: float | None = None
    """Separate learning rate for the projector; None: lr."""
    vision_lr: float | None = None
    """Separate learning rate for the vision tower's trainable parameters (trainable.vision full or lora; a
    tower usually takes a lower rate than the LLM); None: lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming up."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    optim: str = "adamw_torch"
    """adamw_torch, or paged_adamw_8bit (bitsandbytes, GPU): 8-bit optimizer states (2 bytes per trainable
    parameter instead of 8) paged to CPU under memory pressure."""
    gradient_checkpointing: bool | None = None
    """Recompute each decoder layer's activations in backward instead of keeping them: activation memory drops
    from all layers to about one, for one extra forward per layer. Acts only in train mode (the Trainer sets it).
    None: on for qlora, off otherwise."""
    seed: int = 42
    """Seed for weights, data order and dropout."""
    logging_steps: int = 10
    """Log loss, learning rate and grad norm every N steps."""
    save_steps: int = 0
    """Write a resumable checkpoint-N every N steps (0: none; the stage output holds the final weights, and an
    interrupted run starts again)."""
    save_total_limit: int = 2
    """Keep at most this many intermediate checkpoints."""
    dataloader_workers: int = 0
    """DataLoader worker processes."""
    deepspeed: str | None = None
    """DeepSpeed JSON config (configs/deepspeed/zero2.json or zero3.json)."""
    report_to: str = "tensorboard"
    """tensorboard or none."""
    eval_strategy: Literal["auto", "steps", "epoch", "no"] = "auto"
    """When the evaluation loss is computed (on data.eval or data.val_size). auto: every eval_steps steps when
    eval_steps > 0, else at the end of every epoch; no: never."""
    eval_steps: int = 0
    """Evaluate every N optimiser steps (0: at each epoch end)."""
    eval_batch_size: int | None = None
    """Per-device batch of the evaluation loss; None: batch_size."""
    eval_benchmark: EvalBenchmarkSection | None = None
    """A benchmark scored at each epoch end (on the first process; refused under ZeRO-3). None: none."""


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    """The parts of the model and how they load."""
    trainable: TrainableSection = field(default_factory=TrainableSection)
    """What trains, per component."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA hyperparameters."""
    data: DataSection = field(default_factory=DataSection)
    """Training data and how it becomes token ids."""
    train: TrainSection = field(default_factory=TrainSection)
    """Optimisation and output."""
    name: str = "run"
    """A label for logs and reports."""

    def resolved_llm_4bit(self) -> bool:
        if self.model.load_in_4bit is not None:
            return self.model.load_in_4bit
        return self.trainable.llm == "qlora"


class ConfigError(ValueError):
    pass


TRAIN_ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "dataloader_num_workers": "dataloader_workers",
    "per_device_eval_batch_size": "eval_batch_size",
}
"""transformers TrainingArguments name -> TrainSection field, where the two differ."""

_ALIASES: dict[type, dict[str, str]] = {TrainSection: TRAIN_ALIASES}


def _section_of(tp: Any) -> tuple[type, bool] | None:
    """(dataclass, is a list of it) for a field typed as a section, an optional section or a list of them."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [s for a in typing.get_args(tp) if (s := _section_of(a)) is not None]
        return found[0] if found else None
    if dataclasses.is_dataclass(tp):
        return tp, False
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0], True
    return None


def _spell(path: str, override: bool) -> str:
    return f"--{path}" if override else path


def _unknown_key(cls: type, key: str, where: str, override: bool, rest: str = "") -> ConfigError:
    """`key` is no field of section `cls` at `where`: suggest the closest field or alias; at the top level, a
    section's key given without its section is looked up in every section. `rest`: the override key's part
    after `key` (`.lr` in `--trian.lr`), kept in the suggestion."""
    path = f"{where}.{key}" if where else key
    candidates = {n: n for n in (*(f.name for f in dataclasses.fields(cls)), *_ALIASES.get(cls, {}))}
    if not where:
        for f in dataclasses.fields(cls):
            section = _section_of(typing.get_type_hints(cls)[f.name])
            if section is not None and not section[1]:
                names = (*(g.name for g in dataclasses.fields(section[0])), *_ALIASES.get(section[0], {}))
                for n in names:
                    candidates.setdefault(n, f"{f.name}.{n}")
    head = f"override --{path}{rest}" if override else path
    if str(key) in candidates and candidates[str(key)] != str(key):
        return ConfigError(
            f"{head}: unknown key; did you mean {_spell(candidates[str(key)] + rest, override)}?"
        )
    close = difflib.get_close_matches(str(key), list(candidates), n=1)
    if close:
        suggestion = candidates[close[0]] if not where else f"{where}.{candidates[close[0]]}"
        return ConfigError(f"{head}: unknown key; did you mean {_spell(suggestion + rest, override)}?")
    known = sorted(f.name for f in dataclasses.fields(cls))
    return ConfigError(f"{head}: unknown key; {where or 'the config'} has {', '.join(known)}")


def _canonical_names(cls: type, data: Any, where: str, override: bool) -> Any:
    """`data` for section `cls` with aliases replaced by the field names, refusing unknown keys and a field
    given under both its names. Values of the wrong shape are left for _convert to name."""
    if not isinstance(data, dict):
        return data
    aliases = _ALIASES.get(cls, {})
    hints = typing.get_type_hints(cls)
    spelt: dict[str, str] = {}
    out = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in hints:
            raise _unknown_key(cls, key, where, override)
        path = f"{where}.{name}" if where else name
        if name in spelt:
            first, second = (f"{where}.{k}" if where else k for k in (spelt[name], key))
            raise ConfigError(
                f"{_spell(first, override)} and {_spell(second, override)} are the same field; give one"
            )
        spelt[name] = key
        out[name] = _canonical_value(hints[name], value, path, override)
    return out


def _canonical_value(tp: Any, value: Any, where: str, override: bool) -> Any:
    section = _section_of(tp)
    if section is None:
        return value
    cls, is_list = section
    if is_list:
        if not isinstance(value, list):
            return value
        return [_canonical_names(cls, v, f"{where}[{i}]", override) for i, v in enumerate(value)]
    return _canonical_names(cls, value, where, override)


def _canonical_override(key: str, value: Any) -> tuple[str, Any]:
    """An override's dotted key and value with aliases replaced by field names; an unknown key is refused as
    the override's (not the config file's), and a string given for a list of entries gets the list syntax."""
    cls: type | None = RunConfig
    entry: type | None = None  # the entry type, just after a list-of-sections field
    tp: Any = RunConfig
    where = ""
    key = _canonical_key(key)
    for match in _PATH_PART.finditer(key):
        index, name = match.groups()
        if index:
            if entry is None:
                return key, value  # _set_dotted says what is not a list
            cls, entry, tp = entry, None, entry
            where += f"[{index}]"
            continue
        if cls is None:
            return key, value  # under a plain field: _set_dotted says it is not a section
        name = _ALIASES.get(cls, {}).get(name, name)
        hints = typing.get_type_hints(cls)
        if name not in hints:
            raise _unknown_key(cls, name, where, override=True, rest=key[match.end() :])
        where = f"{where}.{name}" if where else name
        tp = hints[name]
        section = _section_of(tp)
        cls, entry = (None, section[0]) if section and section[1] else (section[0] if section else None, None)
    if entry is not None and isinstance(value, str):
        first = dataclasses.fields(entry)[0].name
        raise ConfigError(
            f"override --{where}: expected a list, got {value!r}; set the first entry's {first} with "
            f"--{where}.0.{first} {value}, or give the whole list: --{where} '[{{{first}: {value}}}]'"
        )
    return where, _canonical_value(tp, value, where, override=True)


_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"


@dataclass
class _SourceText:
    """What YAML's parsed values lose, by dotted path as errors name it (`train.output_dir`, `data.train[0].path`)."""

    plain: dict[str, str] = field(default_factory=dict)
    """Source text of unquoted scalars YAML read as something other than a string (`0755` -> 493, `1.10` -> 1.1):
    a field typed str takes this text, not the parsed value turned back into a string."""
    empty: set[str] = field(default_factory=set)
    """Keys written with no value at all (`vision:` with every key under it commented out), unlike an explicit
    `null`; YAML reads both as None."""

    def scan(self, node: yaml.Node | None, where: str, _stack: frozenset[int] = frozenset()) -> None:
        """Record the plain-scalar texts and empty values under `node`, a composed YAML node found at `where`."""
        if node is None:  # an empty document or override value
            self.empty.add(where)
        elif id(node) in _stack:  # an alias that refers to its own ancestor
            return
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = key_node.value
                    self.scan(value_node, f"{where}.{key}" if where else key, _stack | {id(node)})
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.scan(item, f"{where}[{i}]", _stack | {id(node)})
        elif isinstance(node, yaml.ScalarNode) and where:
            if node.tag == _NULL_TAG and node.value == "":
                self.empty.add(where)
            elif node.style is None and node.tag != _STR_TAG:
                self.plain[where] = node.value

    def replace(self, key: str, other: _SourceText | None) -> None:
        """An override of dotted `key` replaced what was there: forget the old texts at and under it, take `other`'s."""

        def under(path: str) -> bool:
            return path == key or path.startswith((f"{key}.", f"{key}["))

        self.plain = {k: v for k, v in self.plain.items() if not under(k)}
        self.empty = {k for k in self.empty if not under(k)}
        if other is not None:
            self.plain.update(other.plain)
            self.empty |= other.empty


class Overrides(dict[str, Any]):
    """`parse_overrides`' result: dotted key -> value parsed as YAML, plus the text each value was written as."""

    def __init__(self) -> None:
        super().__init__()
        self.source: dict[str, _SourceText] = {}
        """Per override key, the source text its parsed value lost (see _SourceText)."""


def _build(cls: type, data: Any, where: str, src: _SourceText | None = None) -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys with their dotted path. An empty section
    (None: `train:` with all its keys commented out) takes every default."""
    src = src if src is not None else _SourceText()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key, src)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str, src: _SourceText) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            if where in src.empty and any(dataclasses.is_dataclass(a) for a in args):
                name = where.rsplit(".", 1)[-1]
                raise ConfigError(
                    f"{where}: the section is empty, which could mean null (none) or all defaults; "
                    f"write `{name}: null` for none, or set at least one of its keys"
                )
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, where, src)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {non_none}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, src)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        out = []
        for i, v in enumerate(value):
            if v is None and dataclasses.is_dataclass(args[0]):
                raise ConfigError(f"{where}[{i}]: empty entry; expected a mapping")
            out.append(_convert(args[0], v, f"{where}[{i}]", src))
        return out
    if origin is Literal:
        if value not in args and src.plain.get(where) in args:
            return src.plain[where]  # YAML reads an unquoted `no` (train.eval_strategy) as false
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)  # YAML reads "1e-3" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int:
            if not number.is_integer():
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if value is not None and not isinstance(value, list | dict) and where in src.plain:
            return src.plain[where]  # the text as written: 0755 stays "0755", 1.10 stays "1.10"
        if not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


_PATH_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def _canonical_key(key: str) -> str:
    """`data.train.0.path` -> `data.train[0].path`, the spelling errors and source texts use."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set `section.key` or `section.list[i].key` (an existing list entry) in the parsed YAML."""
    parts = [int(index) if index else name for index, name in _PATH_PART.findall(dotted)]
    node: Any = data
    for depth, part in enumerate(parts):
        parent = _canonical_key(".".join(str(p) for p in parts[:depth])) or "the config"
        if isinstance(part, int):
            if not isinstance(node, list):
                raise ConfigError(f"override --{dotted}: {parent} is not a list")
            if part >= len(node):
                n = len(node)
                raise ConfigError(
                    f"override --{dotted}: {parent} has {n} entr{'y' if n == 1 else 'ies'} (index 0..{n - 1})"
                )
        elif not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: {parent} is not a section")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def parse_overrides(args: list[str]) -> Overrides:
    """`--train.lr 1e-3 --data.packing true` -> {"train.lr": 1e-3, "data.packing": True} (values parsed as YAML;
    string fields keep the text as written, see Overrides). A key given twice keeps its last value."""
    out = Overrides()
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            raw = args[i + 1]
            i += 2
        key = _canonical_key(key.replace("-", "_"))
        try:
            value = yaml.safe_load(raw)
            node = yaml.compose(raw, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"override --{key}: {raw!r} is not valid YAML: {e}") from None
        src = _SourceText()
        src.scan(node, key)
        out.pop(key, None)  # re-inserted last: applied after any section override given before it
        out[key] = value
        out.source[key] = src
    return out


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, *, for_training: bool = False
) -> RunConfig:
    """The config at `path` (None: defaults) with dotted overrides, validated. for_training: also check what only
    this machine can tell (the DeepSpeed file exists, the report_to integration is installed); a stage output's
    config is read elsewhere too (chat, export, eval, a later stage) and must load there. llava_ft's own names
    are checked by `model.build.check_names`, where they are defined."""
    canonical: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        name, value = _canonical_override(key, value)
        if spelt.get(name, key) != key:
            raise ConfigError(f"override --{spelt[name]} and --{key} are the same field; give one")
        spelt[name] = key
        canonical.pop(name, None)  # the last one given is applied last
        canonical[name] = value
    data: Any = {}
    src = _SourceText()
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
            src.scan(yaml.compose(text, Loader=yaml.SafeLoader), "")
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    sources = getattr(overrides, "source", {})
    where = str(path) if path is not None else "<overrides>"
    try:
        data = _canonical_names(RunConfig, data, "", override=False)
        for key, value in canonical.items():
            _set_dotted(data, key, value)
            src.replace(key, sources.get(spelt[key]))
        cfg = _build(RunConfig, data, "", src)
        validate(cfg)
        train = data.get("train") if isinstance(data, dict) else None
        derive_grad_accum(cfg.train, world_size(), explicit=isinstance(train, dict) and "grad_accum" in train)
        if for_training:
            _check_training_machine(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _need(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def _validate_names(cfg: RunConfig) -> None:
    """transformers' scheduler and optimizer names, checked at load rather than when the run is built (minutes
    later, after data preparation). llava_ft's own names are checked where they are defined:
    model.build.check_names."""
    default = TrainSection()
    if (cfg.train.lr_scheduler, cfg.train.optim) == (default.lr_scheduler, default.optim):
        return  # transformers' own names; the look-up below imports torch and peft (seconds)
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    schedulers = [s.value for s in SchedulerType]
    if cfg.train.lr_scheduler not in schedulers:
        raise ConfigError(f"train.lr_scheduler: {cfg.train.lr_scheduler!r} is not one of {schedulers}")
    optimizers = [o.value for o in OptimizerNames]
    if cfg.train.optim not in optimizers:
        raise ConfigError(f"train.optim: {cfg.train.optim!r} is not one of transformers' {optimizers}")


def _check_training_machine(cfg: RunConfig) -> None:
    from transformers.integrations import get_available_reporting_integrations  # imports torch: see above

    installed = get_available_reporting_integrations()
    if cfg.train.report_to not in ("none", "all", *installed):
        raise ConfigError(
            f"train.report_to: {cfg.train.report_to!r} is not installed here; installed: {installed}, all or none"
        )
    if cfg.train.deepspeed is not None and not Path(cfg.train.deepspeed).is_file():
        raise ConfigError(f"train.deepspeed: {cfg.train.deepspeed}: no such file")
    bench = cfg.train.eval_benchmark
    if bench is not None:
        if not Path(bench.data).is_file():
            raise ConfigError(f"train.eval_benchmark.data: {bench.data}: no such file")
        if bench.images is not None and not Path(bench.images).is_dir():
            raise ConfigError(f"train.eval_benchmark.images: {bench.images}: no such folder")
        if cfg.train.deepspeed is not None and _zero_stage(cfg.train.deepspeed) == 3:
            # Generation on the first process alone would wait forever for the other ranks' parameter shards.
            raise ConfigError(
                f"train.eval_benchmark cannot run under ZeRO-3 ({cfg.train.deepspeed}); score the stage output "
                "with `llava-ft eval` instead, or use ZeRO-2"
            )


def _zero_stage(path: str) -> int | None:
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed: {path}: not readable JSON ({e})") from None
    stage = ds.get("zero_optimization", {}).get("stage") if isinstance(ds, dict) else None
    return stage if isinstance(stage, int) else None


def _validate_eval(cfg: RunConfig) -> None:
    """The evaluation fields: one eval set at most, and what evaluates has something to evaluate."""
    d, t = cfg.data, cfg.train
    if d.eval and d.val_size is not None:
        raise ConfigError("data.eval and data.val_size are both set; give one (val_size splits data.train)")
    if d.val_size is not None:
        fraction = isinstance(d.val_size, float)
        _need(
            (0 < d.val_size < 1) if fraction else d.val_size >= 1,
            "data.val_size",
            d.val_size,
            "a count >= 1 or a fraction between 0 and 1",
        )
    _need(t.eval_steps >= 0, "train.eval_steps", t.eval_steps, ">= 0 (0: at each epoch end)")
    if t.eval_batch_size is not None:
        _need(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, ">= 1 or null (batch_size)")
    has_eval = bool(d.eval) or d.val_size is not None
    if not has_eval and (t.eval_steps > 0 or t.eval_strategy in ("steps", "epoch")):
        what = "train.eval_steps" if t.eval_steps > 0 else f"train.eval_strategy {t.eval_strategy}"
        raise ConfigError(f"{what} needs an eval set: set data.eval or data.val_size")
    if t.eval_strategy == "steps" and t.eval_steps == 0:
        raise ConfigError("train.eval_strategy steps needs train.eval_steps > 0")
    bench = t.eval_benchmark
    if bench is not None:
        _need(bool(bench.data), "train.eval_benchmark.data", bench.data, "a benchmark file")
        if bench.kind != "mmbench" and bench.images is None:
            raise ConfigError(f"train.eval_benchmark.images: {bench.kind} needs the image folder")
        if bench.limit is not None:
            _need(bench.limit >= 1, "train.eval_benchmark.limit", bench.limit, ">= 1 or null (all)")
        _need(bench.batch_size >= 1, "train.eval_benchmark.batch_size", bench.batch_size, ">= 1")
        _need(bench.max_new_tokens >= 1, "train.eval_benchmark.max_new_tokens", bench.max_new_tokens, ">= 1")


def _validate_images(cfg: RunConfig) -> None:
    if cfg.data.max_image_tokens is not None:
        _need(
            cfg.data.max_image_tokens >= 1, "data.max_image_tokens", cfg.data.max_image_tokens, ">= 1 or null"
        )
    vision = cfg.model.vision
    if vision is None or vision.anyres is None:
        return
    a = vision.anyres
    if vision.image_aspect not in (None, "resize"):
        raise ConfigError(
            f"model.vision.anyres squashes the base view as LLaVA-NeXT does; model.vision.image_aspect "
            f"{vision.image_aspect} would give a model its exports cannot reproduce: set resize or null"
        )
    if vision.pool != 1:
        raise ConfigError(
            f"model.vision.anyres needs model.vision.pool 1 (LLaVA-NeXT pools nothing), got {vision.pool}"
        )
    if a.max_tiles is not None:
        _need(a.max_tiles >= 1, "model.vision.anyres.max_tiles", a.max_tiles, ">= 1 or null")
    if a.max_image_tokens is not None:
        _need(
            a.max_image_tokens >= 1,
            "model.vision.anyres.max_image_tokens",
            a.max_image_tokens,
            ">= 1 or null",
        )
    for i, point in enumerate(a.grid_pinpoints or []):
        if len(point) != 2 or min(point) < 1:
            raise ConfigError(
                f"model.vision.anyres.grid_pinpoints[{i}]: expected [height, width] in pixels, got {point}"
            )


def validate(cfg: RunConfig) -> None:
    if cfg.trainable.vision != "frozen" and cfg.model.vision is None:
        raise ConfigError(f"trainable.vision is {cfg.trainable.vision} but model.vision is null")
    if cfg.trainable.llm == "qlora" and cfg.model.load_in_4bit is False:
        raise ConfigError("trainable.llm is qlora but model.load_in_4bit is false")
    if cfg.trainable.llm == "full" and cfg.resolved_llm_4bit():
        raise ConfigError("trainable.llm full cannot train a 4-bit LLM; use qlora or load_in_4bit: false")
    if cfg.data.max_length <= 0:
        raise ConfigError("data.max_length must be positive")
    if cfg.data.pack_length is not None and cfg.data.pack_length < cfg.data.max_length:
        raise ConfigError(
            f"data.pack_length {cfg.data.pack_length} is shorter than data.max_length {cfg.data.max_length}: "
            "a sample of max_length would fit no row"
        )
    if cfg.data.num_proc is not None and cfg.data.num_proc < 1:
        raise ConfigError(f"data.num_proc must be >= 1 or null (automatic), got {cfg.data.num_proc}")
    _validate_images(cfg)
    if cfg.model.loss_chunk_size <= 0:
        raise ConfigError("model.loss_chunk_size must be positive")
    _validate_names(cfg)
    _validate_eval(cfg)
    t = cfg.train
    lora = cfg.lora
    _need(lora.r >= 1, "lora.r", lora.r, ">= 1")
    _need(lora.vision_r >= 1, "lora.vision_r", lora.vision_r, ">= 1")
    _need(0 <= lora.dropout < 1, "lora.dropout", lora.dropout, ">= 0 and < 1")
    _need(t.logging_steps >= 1, "train.logging_steps", t.logging_steps, ">= 1")
    _need(t.save_steps >= 0, "train.save_steps", t.save_steps, ">= 0 (0: no checkpoints)")
    _need(t.save_total_limit >= 1, "train.save_total_limit", t.save_total_limit, ">= 1")
    _need(t.dataloader_workers >= 0, "train.dataloader_workers", t.dataloader_workers, ">= 0")
    if t.max_steps > 0:  # epochs is then ignored and may be 0, but is never negative or infinite
        _need(math.isfinite(t.epochs) and t.epochs >= 0, "train.epochs", t.epochs, "a finite number >= 0")
    else:
        _need(
            math.isfinite(t.epochs) and t.epochs > 0,
            "train.epochs",
            t.epochs,
            "a finite number > 0 (or set train.max_steps > 0)",
        )
    _need(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1")
    # lr 0 is allowed: a run that only checks the pipeline (and tests) trains nothing on purpose.
    _need(math.isfinite(t.lr) and t.lr >= 0, "train.lr", t.lr, "a finite number >= 0")
    for name, lr in (("projector_lr", t.projector_lr), ("vision_lr", t.vision_lr)):
        if lr is not None:
            _need(
                math.isfinite(lr) and lr >= 0, f"train.{name}", lr, "a finite number >= 0 or null (train.lr)"
            )
    _need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, ">= 0 and < 1")
    _need(
        math.isfinite(t.weight_decay) and t.weight_decay >= 0,
        "train.weight_decay",
        t.weight_decay,
        "a finite number >= 0",
    )
    _need(
        math.isfinite(t.max_grad_norm) and t.max_grad_norm >= 0,
        "train.max_grad_norm",
        t.max_grad_norm,
        "a finite number >= 0 (0: no clipping)",
    )


def world_size() -> int:
    """Training processes, as torchrun and the DeepSpeed launcher state it; 1 without them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def derive_grad_accum(t: TrainSection, world: int, explicit: bool) -> None:
    """Set t.grad_accum from t.global_batch_size (when set) for `world` processes; `explicit`: grad_accum was
    given too, and must agree."""
    g = t.global_batch_size
    if g is None:
        return
    _need(g >= 1, "train.global_batch_size", g, ">= 1 or null")
    per_step = t.batch_size * world
    if g % per_step:
        raise ConfigError(
            f"train.global_batch_size {g} is not a multiple of batch_size {t.batch_size} x {_processes(world)}"
            f" = {per_step}"
        )
    if explicit and t.grad_accum != g // per_step:
        raise ConfigError(
            f"train.grad_accum {t.grad_accum} disagrees with train.global_batch_size {g} = {t.batch_size} per "
            f"device x {g // per_step} accumulation x {_processes(world)}; drop grad_accum or set it to "
            f"{g // per_step}"
        )
    t.grad_accum = g // per_step


def global_batch_line(t: TrainSection, world: int) -> str:
    """The global batch as logged at start; refuses a global_batch_size the run does not have (a config built
    for another process count)."""
    g = t.batch_size * t.grad_accum * world
    if t.global_batch_size is not None and t.global_batch_size != g:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} != batch_size {t.batch_size} x grad_accum "
            f"{t.grad_accum} x {_processes(world)} = {g}; load the config where it runs"
        )
    return f"global batch {g} = {t.batch_size} per device x {t.grad_accum} accumulation x {_processes(world)}"


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain data. With global_batch_size set, grad_accum is left out: it is derived again for
    the process count of wherever the config is loaded."""
    out = dataclasses.asdict(cfg)
    if cfg.train.global_batch_size is not None:
        del out["train"]["grad_accum"]
    return out


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
