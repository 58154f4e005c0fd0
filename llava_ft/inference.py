"""One generate path (batched, left padding) shared by chat, evaluation, the web demo and export checks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_ft.data.conversation import Conversation, Message

log = logging.getLogger("llava_ft")


@dataclass
class Query:
    question: str
    """User text. When `image` is set and the text has no `<image>` marker, one is put in front."""
    image: object | None = None
    """A PIL image, or None for a text-only question."""


class Assistant:
    """A trained checkpoint ready to answer: model, tokenizer, chat template, image processor."""

    def __init__(self, model, tokenizer, template, device: torch.device | str = "cpu"):
        from llava_ft.data.tokenize import Encoder

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.device = torch.device(device)
        self.processor = model.vision_tower.processor if model.vision_tower is not None else None
        self.encoder = Encoder(tokenizer, template, max_length=None, num_image_tokens=model.num_image_tokens)
        self.stop_ids = stop_token_ids(tokenizer, template.stop_words)

    @classmethod
    def load(cls, checkpoint: str | Path, *, load_4bit: bool = False, device: str | None = None) -> Assistant:
        from llava_ft.data.templates import get_template
        from llava_ft.model.build import build_model
        from llava_ft.train.checkpoint import apply_stage_weights, read_stage_config, read_template_info

        ckpt = Path(checkpoint)
        cfg = read_stage_config(ckpt)
        if (ckpt / "llm").is_dir():
            cfg.model.llm = str(ckpt / "llm")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer, model = build_model(cfg, load_in_4bit=load_4bit)
        apply_stage_weights(model, ckpt, adapters="load")
        template = get_template(read_template_info(ckpt)["name"], tokenizer)
        if not load_4bit:
            model.to(device)
        return cls(model, tokenizer, template, device)

    # -- prompts -------------------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[Message], n_images: int) -> list[int]:
        conv = Conversation(messages=list(messages), images=["<in memory>"] * n_images)
        return self.encoder.encode_prompt(conv)

    def _embed_batch(self, prompts: list[list[int]], images: list[list]):
        """Left-padded inputs_embeds + attention mask for a batch of prompts."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        flat = [img for per in images for img in per]
        pixel_values = None
        if flat:
            pixel_values = torch.stack([self.processor(img) for img in flat]).to(self.device)
        with torch.no_grad():
            embeds = self.model.embed(ids.to(self.device), pixel_values)
        return embeds, mask.to(self.device)

    # -- generation ----------------------------------------------------------------------------------------
    def generate_messages(
        self,
        batch: list[tuple[list[Message], list]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        streamer=None,
    ) -> list[str]:
        """Answer a batch of conversations (each ending with a user turn) with their images."""
        prompts = [self.prompt_ids(msgs, len(imgs)) for msgs, imgs in batch]
        embeds, mask = self._embed_batch(prompts, [imgs for _, imgs in batch])
        sampling = temperature > 0
        with torch.no_grad():
            out = self.model.llm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=None,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
            )
        return [self._decode(row) for row in out]

    def _decode(self, row: torch.Tensor) -> str:
        ids = row.tolist()
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate(self, queries: list[Query], *, max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            answers += self.generate_messages([self._as_messages(q) for q in chunk], max_new_tokens=max_new_tokens)
        return answers

    def option_logprobs(self, queries: list[Query], options: list[str], *, batch_size: int = 8) -> list[list[float]]:
        """log P(option | query) for each option as the start of the assistant answer (no generation)."""
        option_ids = [self.tokenizer.encode(o, add_special_tokens=False) for o in options]
        scores: list[list[float]] = []
        for q in queries:
            msgs, imgs = self._as_messages(q)
            prompt = self.prompt_ids(msgs, len(imgs))
            rows = [prompt + ids for ids in option_ids]
            # Right padding here: each row's option tokens are read at known positions.
            width = max(len(r) for r in rows)
            pad_id = self.tokenizer.pad_token_id or 0
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            pixel_values = None
            if imgs:
                pixel_values = torch.stack([self.processor(img) for img in imgs] * len(rows)).to(self.device)
            with torch.no_grad():
                embeds = self.model.embed(ids.to(self.device), pixel_values)
                logits = self.model.llm(inputs_embeds=embeds, attention_mask=mask.to(self.device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            row_scores = []
            for i, opt in enumerate(option_ids):
                positions = range(len(prompt) - 1, len(prompt) - 1 + len(opt))
                row_scores.append(float(sum(logp[i, p, t] for p, t in zip(positions, opt, strict=True))))
            scores.append(row_scores)
        return scores

    @staticmethod
    def _as_messages(q: Query) -> tuple[list[Message], list]:
        text = q.question
        images = [q.image] if q.image is not None else []
        if images and "<image>" not in text:
            text = "<image>\n" + text
        return [Message("user", text)], images


def stop_token_ids(tokenizer, stop_words: list[str]) -> list[int]:
    ids = set()
    for word in stop_words:
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(enc[0])
        else:
            log.warning("stop word %r is %d tokens; generation stops on eos only for it", word, len(enc))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def load_assistant(checkpoint: str, *, load_4bit: bool = False) -> Assistant:
    return Assistant.load(checkpoint, load_4bit=load_4bit)
