"""The stage-output format: what a training stage writes, and `load_stage`, the one way to load it back.

A stage output folder holds llava_ft.yaml (the resolved config, written last: its presence means complete),
template.json (chat template name and stop words) and the parts that trained: projector.safetensors,
vision.safetensors (the vision tower's trained tensors), llm_adapter/ and vision_adapter/ (peft LoRA adapters),
llm/ (a whole LLM with its tokenizer). stage.json marks an output that holds every trained part it needs (the
projector and tower of the init_from chain are copied in; a whole LLM trained earlier is its model.llm), so
loading never reads init_from folders.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from llava_ft.config import RunConfig, dump_config
from llava_ft.data.templates import ChatTemplate, get_template
from llava_ft.files import atomic_dir, atomic_path, atomic_write_bytes, sweep_leftovers
from llava_ft.folders import (  # noqa: F401  (stage's names for its users)
    BASE_PATHS,
    CONFIG_NAME,
    TEMPLATE_NAME,
    add_base_path_args,
    base_overrides,
    read_json,
    read_stage_config,
    read_template_info,
)
from llava_ft.model.build import build_model
from llava_ft.model.trainability import peft_wrap

log = logging.getLogger("llava_ft")

PROJECTOR_NAME = "projector.safetensors"
VISION_NAME = "vision.safetensors"
"""The vision tower's trainable tensors after a trainable.vision full stage, named as in the bare tower."""
STAGE_NAME = "stage.json"


@dataclass
class LoadedStage:
    """A stage output built into a model with its trained weights applied."""

    config: RunConfig
    """The stage's config, model.llm pointing at the LLM the weights apply to."""
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate
    model: torch.nn.Module
    """LlavaModel with every adapter of the chain applied (not merged), in eval mode."""
    stop_words: list[str]
    """The stop words saved with the stage (those training used)."""


def load_stage(
    path: str | Path,
    *,
    load_in_4bit: bool = False,
    dtype: str | None = None,
    overrides: dict[str, str | None] | None = None,
) -> LoadedStage:
    """Build the model a stage output describes and apply its weights (and those of its init_from chain).

    `dtype` overrides the config's model.dtype (export merges in float32); `overrides` maps "model.llm" and
    "model.vision.model" to base model folders at other paths. Damaged files and missing base models are
    named before any model loads."""
    ckpt = Path(path)
    cfg = resolve_base_paths(stage_model_config(ckpt), ckpt, overrides or {})
    info = check_stage_files(ckpt)
    if dtype is not None:
        cfg.model.dtype = dtype
    tokenizer, model = build_model(cfg, load_in_4bit=load_in_4bit)
    apply_stage_weights(model, ckpt, adapters="load")
    template = get_template(info["name"], tokenizer)
    return LoadedStage(
        cfg, tokenizer, template, model.eval(), list(info.get("stop_words", template.stop_words))
    )


def resolve_base_paths(cfg: RunConfig, ckpt: Path, overrides: dict[str, str | None]) -> RunConfig:
    """cfg with the given base model paths replaced; a saved local path that no longer exists and has no
    override is reported with the flag that supplies it (a hub id, not a local path, is left to the loader)."""
    vision = cfg.model.vision
    for key in BASE_PATHS:
        if key == "model.vision.model" and vision is None:
            continue
        saved = cfg.model.llm if key == "model.llm" else vision.model
        local = saved.removeprefix("local-dir:")
        if new := overrides.get(key):
            # open_clip's "local-dir:" marks a folder rather than a hub name: kept, so the flag takes a DIR
            new = saved[: len(saved) - len(local)] + new.removeprefix("local-dir:")
            if key == "model.llm":
                cfg.model.llm = new
            else:
                vision.model = new
            continue
        if Path(local).is_absolute() and not Path(local).exists():
            raise FileNotFoundError(f"`{ckpt / CONFIG_NAME}`: {key} {local} not found; pass --{key} DIR")
    return cfg


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file of detached CPU copies, all or nothing."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def save_stage_output(model, cfg: RunConfig, tokenizer, template, out_dir: str | Path) -> Path:
    """Write the parts of `model` that `cfg` trains, the template and the config (last) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out)  # a killed save's temporaries; a part it left moved aside is put back first
    (out / CONFIG_NAME).unlink(missing_ok=True)  # incomplete until rewritten at the end
    trains = _trained_parts(cfg, model)
    # A projector or tower this stage does not train in full but the init_from chain did: its file is copied
    # byte for byte, so the output loads the very tensors the chain would apply, in their saved dtype.
    present = {PROJECTOR_NAME: model.projector is not None, VISION_NAME: model.vision_tower is not None}
    carried = {name: _chain_file(cfg, name) for name, there in present.items() if there and not trains[name]}
    for name, trained in trains.items():
        if not trained and (out / name).exists() and carried.get(name) is None:
            _remove_stale(out, name)
    if trains[PROJECTOR_NAME]:
        atomic_save_tensors(model.projector.state_dict(), out / PROJECTOR_NAME)
    if trains[VISION_NAME]:
        # The trained tensors only (the rest is the base tower's): under ZeRO-3 these are the gathered ones.
        tower = {n: p for n, p in model.vision_tower.named_parameters() if p.requires_grad}
        atomic_save_tensors(tower, out / VISION_NAME)
    for name, source in carried.items():
        if source is not None:
            atomic_write_bytes(out / name, source.read_bytes())
    if trains["llm_adapter"]:
        atomic_dir(out / "llm_adapter", lambda d: model.llm.save_pretrained(d, safe_serialization=True))
    if trains["llm"]:

        def write_llm(d: Path) -> None:
            model.llm.save_pretrained(d, safe_serialization=True)
            tokenizer.save_pretrained(d)

        atomic_dir(out / "llm", write_llm)
    if trains["vision_adapter"]:
        atomic_dir(
            out / "vision_adapter", lambda d: model.vision_tower.save_pretrained(d, safe_serialization=True)
        )
    info = {"name": template.name, "stop_words": list(template.stop_words)}
    atomic_write_bytes(out / TEMPLATE_NAME, json.dumps(info, indent=2).encode())
    # model.llm is the whole LLM an earlier stage trained (train/run.py points it there), kept as the base.
    llm_from_init = bool(cfg.train.init_from) and trained_llm(cfg.train.init_from) is not None
    stage_info = {"self_contained": True, "llm_from_init": llm_from_init}
    atomic_write_bytes(out / STAGE_NAME, json.dumps(stage_info, indent=2).encode())
    with atomic_path(out / CONFIG_NAME) as tmp:
        dump_config(absolute_paths(cfg), tmp)
    log.info("stage output written to %s", out)
    return out


def _trained_parts(cfg: RunConfig, model) -> dict[str, bool]:
    """Which parts of a stage output this config writes (the only place that decides it)."""
    return {
        PROJECTOR_NAME: cfg.trainable.projector == "full" and model.projector is not None,
        VISION_NAME: cfg.trainable.vision == "full" and model.vision_tower is not None,
        "llm_adapter": cfg.trainable.llm in ("lora", "qlora"),
        "llm": cfg.trainable.llm == "full",
        "vision_adapter": cfg.trainable.vision == "lora",
    }


def _chain_file(cfg: RunConfig, name: str) -> Path | None:
    """The projector or tower file the init_from chain applies last (the newest stage holding one), if any."""
    if not cfg.train.init_from:
        return None
    chain = stage_chain(cfg.train.init_from)
    return next((st / name for st in reversed(chain) if (st / name).is_file()), None)


def _stage_info(ckpt: Path) -> dict:
    """stage.json of a stage output; {} for one without (an older llava_ft wrote it; its init_from is followed)."""
    path = ckpt / STAGE_NAME
    return read_json(path) if path.is_file() else {}


def _remove_stale(out: Path, name: str) -> None:
    """A part an earlier run into the same folder trained but this one does not: loading applies every part
    present, so a leftover adapter or projector would silently change the model."""
    log.warning("%s: removing %s left by an earlier run (this stage does not train it)", out, name)
    part = out / name
    if part.is_dir():
        shutil.rmtree(part)
    else:
        part.unlink()


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Copy of cfg whose existing file paths are absolute, so a checkpoint works from any working directory."""
    c = copy.deepcopy(cfg)

    def absolute(p: str | None) -> str | None:
        prefix = "local-dir:" if p and p.startswith("local-dir:") else ""
        path = p[len(prefix) :] if p else p
        if not path or not Path(path).exists():
            return p
        return prefix + str(Path(path).resolve())

    c.model.llm = absolute(c.model.llm)
    if c.model.vision is not None:
        c.model.vision.model = absolute(c.model.vision.model)
        c.model.vision.pretrained = absolute(c.model.vision.pretrained)
    c.train.output_dir = str(Path(c.train.output_dir).resolve())
    c.train.init_from = absolute(c.train.init_from)
    c.train.deepspeed = absolute(c.train.deepspeed)
    for src in [*c.data.train, *c.data.eval]:
        src.path = absolute(src.path)
        src.image_folder = absolute(src.image_folder)
    if (bench := c.train.eval_benchmark) is not None:
        bench.data, bench.images = absolute(bench.data), absolute(bench.images)
    return c


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """load_file, with a damaged file (truncated, not safetensors) reported by name instead of a raw
    SafetensorError, which the command line does not catch."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _damaged(path, e) from None


def _damaged(path: Path, error: Exception) -> ValueError:
    """The error for a weights file that does not read as safetensors."""
    return ValueError(f"{path}: cannot read it ({error}); the file is damaged or truncated")


def _adapter_weights(adapter: Path) -> Path:
    """The weights file of a peft adapter folder; without this check peft takes the missing local folder for a
    hub repo id and fails with "Repo id must be in the form ..."."""
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: LoRA adapter folder without adapter_config.json (incomplete)")
    if (adapter / "adapter_model.safetensors").is_file():  # the only form llava_ft writes and reads
        return adapter / "adapter_model.safetensors"
    raise FileNotFoundError(f"{adapter}: LoRA adapter folder without adapter_model.safetensors (incomplete)")


def check_stage_files(ckpt: str | Path) -> dict:
    """Cheap checks of everything `apply_stage_weights` will read along the chain, so that a damaged stage
    output fails before the models are built: template.json parses, safetensors headers read, adapter folders
    complete. Returns the template info."""
    info = read_template_info(ckpt)
    for stage in stage_chain(ckpt):
        files = [stage / name for name in (PROJECTOR_NAME, VISION_NAME) if (stage / name).is_file()]
        files += [
            _adapter_weights(stage / sub)
            for sub in ("llm_adapter", "vision_adapter")
            if (stage / sub).is_dir()
        ]
        for path in files:
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except SafetensorError as e:
                raise _damaged(path, e) from None
    return info


def stage_chain(ckpt: str | Path) -> list[Path]:
    """The stage and the stages it started from (train.init_from, followed back), oldest first; a self-contained
    stage (stage.json) ends the chain, since it holds what its init_from contributed."""
    chain = [Path(ckpt)]
    while not _stage_info(chain[0]).get("self_contained") and (
        init_from := read_stage_config(chain[0]).train.init_from
    ):
        stage = Path(init_from)
        if not stage.is_dir():
            raise FileNotFoundError(
                f"{chain[0]}: train.init_from {stage} not found; this stage output predates self-contained "
                "outputs and needs it: restore that folder, or re-save the stage with this llava_ft"
            )
        if any(stage.resolve() == p.resolve() for p in chain):
            raise ValueError(f"{chain[-1]}: train.init_from chain loops back to {stage}")
        chain.insert(0, stage)
    return chain


def trained_llm(ckpt: str | Path) -> Path | None:
    """The newest whole LLM trained along the chain (a stage's llm/): the base every later stage builds on."""
    chain = stage_chain(ckpt)
    if (llm := next((st / "llm" for st in reversed(chain) if (st / "llm").is_dir()), None)) is not None:
        return llm
    if _stage_info(chain[0]).get("llm_from_init"):  # a self-contained stage: its model.llm is that LLM
        return Path(read_stage_config(chain[0]).model.llm.removeprefix("local-dir:"))
    return None


def stage_model_config(ckpt: str | Path) -> RunConfig:
    """A stage's config with model.llm pointing at the LLM its weights apply to (`trained_llm`, if any)."""
    cfg = read_stage_config(ckpt)
    if (llm := trained_llm(ckpt)) is not None:
        cfg.model.llm = str(llm)
    return cfg


def stage_fingerprint(ckpt: str | Path) -> str:
    """Digest of everything `apply_stage_weights` reads: each stage's config (which names the base models),
    template and trained weights along the chain. A stage retrained in place gets another. A folder without
    llava_ft.yaml holding a config.json (an hf-llava or merged-llm export) is a whole model: all its files count."""
    digest = hashlib.sha256()
    for stage, files in _fingerprinted_files(Path(ckpt)):
        for path in files:
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                digest.update(
                    f"{path.relative_to(stage)}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode()
                )
    return "sha256:" + digest.hexdigest()[:16]


def _fingerprinted_files(ckpt: Path) -> list[tuple[Path, list[Path]]]:
    """(folder, the files of it that make the model) for the stage chain, or for an export folder."""
    if not (ckpt / CONFIG_NAME).is_file() and (ckpt / "config.json").is_file():
        return [(ckpt, sorted(p for p in ckpt.rglob("*") if p.is_file()))]
    out = []
    for stage in stage_chain(ckpt):
        files = [stage / CONFIG_NAME, stage / TEMPLATE_NAME, stage / STAGE_NAME, stage / PROJECTOR_NAME]
        files.append(stage / VISION_NAME)
        for sub in ("llm_adapter", "vision_adapter", "llm"):
            if (stage / sub).is_dir():
                files += sorted(p for p in (stage / sub).rglob("*") if p.is_file())
        out.append((stage, files))
    return out


def apply_stage_weights(model, ckpt: str | Path, *, adapters: str = "load") -> None:
    """Load the trained weights of a stage and of the stages it started from into `model`, oldest first.

    The model must already be built on `trained_llm(ckpt)` when the chain trained a whole LLM. A projector, and
    a tower trained in full, are overwritten by each later stage that trained them; a stage's tower weights are
    applied before its tower adapter, which they are the base of. A LoRA stage saves its whole adapter,
    continued from the one it started from, so per module only the newest adapter of the chain is applied.
    adapters="load": wrap the module in that adapter (inference); "init": copy its weights into the model's own
    peft wrapper (a stage that continues training LoRA).
    """
    chain = stage_chain(ckpt)
    newest = {sub: max((i for i, st in enumerate(chain) if (st / sub).is_dir()), default=None)
              for sub in ("llm_adapter", "vision_adapter")}  # fmt: skip
    for i, stage in enumerate(chain):
        if (stage / PROJECTOR_NAME).is_file():
            if model.projector is None:
                raise ValueError(f"{stage}: has projector weights but this model has no vision tower")
            state = _load_tensors(stage / PROJECTOR_NAME)
            try:
                model.projector.load_state_dict(state)
            except RuntimeError as e:  # names or shapes of another projector
                raise ValueError(
                    f"{stage / PROJECTOR_NAME}: does not fit this model's projector: {e}"
                ) from None
            log.info("projector weights from %s", stage)
        if (stage / VISION_NAME).is_file():
            if model.vision_tower is None:
                raise ValueError(f"{stage}: has vision tower weights but this model has no vision tower")
            _load_tower(model.vision_tower, _load_tensors(stage / VISION_NAME), stage / VISION_NAME)
            log.info("vision tower weights from %s", stage)
        for sub, attr in (("llm_adapter", "llm"), ("vision_adapter", "vision_tower")):
            if newest[sub] != i:
                continue
            adapter = stage / sub
            weights = _adapter_weights(adapter)
            module = getattr(model, attr)
            if adapters == "load":
                try:
                    with peft_wrap():
                        setattr(model, attr, PeftModel.from_pretrained(module, str(adapter)))
                except SafetensorError as e:
                    raise _damaged(weights, e) from None
            else:
                if not hasattr(module, "peft_config"):
                    # merged-llm holds the LLM alone: a tower adapter has no merged form a later stage can start from
                    fix = (
                        "merge it first (llava-ft export --format merged-llm) and point model.llm at the result"
                        if attr == "llm"
                        else "keep trainable.vision lora to continue it"
                    )
                    raise ValueError(
                        f"{adapter}: init_from holds a LoRA adapter but this stage does not train LoRA on {attr}; "
                        + fix
                    )
                loaded = set_peft_model_state_dict(module, _load_tensors(weights))
                _check_adapter_fits(module, loaded, adapter)
            log.info("%s adapter from %s", attr, adapter)


def _load_tower(tower: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy a tower's saved tensors into it, also when a LoRA stage has wrapped it in peft already (its names
    then gain `base_model.model.` and `.base_layer`)."""
    own = {}
    for name, tensor in tower.state_dict(keep_vars=True).items():
        own[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = tensor
    unknown = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unknown or wrong:
        raise ValueError(
            f"{path}: does not fit this model's vision tower ({len(unknown)} tensors without a place, e.g. "
            f"{unknown[:3]}; {len(wrong)} of another shape, e.g. {wrong[:3]})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype))


def _check_adapter_fits(module, loaded, adapter: Path) -> None:
    """Continuing an adapter with other LoRA settings (target_modules, rank) would silently start from a model
    the earlier stage never produced; and only this stage's adapter is applied on load, so the rest is lost."""
    unexpected = list(loaded.unexpected_keys)
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"{adapter}: the adapter does not fit this stage's LoRA ({len(unexpected)} saved tensors without a place, "
            f"e.g. {unexpected[:3]}; {len(missing)} LoRA tensors not in the adapter, e.g. {missing[:3]}): use the "
            "same lora settings as the stage it continues, or merge it first (llava-ft export --format merged-llm)"
        )
