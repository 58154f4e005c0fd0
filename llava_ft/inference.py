"""One generate path (batched, left padding) shared by chat, evaluation, the web demo and export checks.

Prompts are built by the checkpoint's chat template and tokenized like training text (`Encoder.encode_prompt`).
Rows are left-padded with position ids that restart at each row's first real token, so a row's answer does not
depend on its batch. Generation ends on the template's stop words, and the answer is cut before the first one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import StoppingCriteriaList, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.anyres import pixel_inputs
from llava_ft.data.conversation import Conversation, Message
from llava_ft.data.tokenize import Encoder, Sizes
from llava_ft.exported import folder_kind, load_export
from llava_ft.query import Query  # noqa: F401  (inference's name for its users)
from llava_ft.stage import load_stage

log = logging.getLogger("llava_ft")

# A conversation to answer (ending on a user turn) and its images, one per `<image>` marker, in order.
Prompt = tuple[list[Message], list]


class Assistant:
    """A trained checkpoint ready to answer: model, tokenizer, chat template, image processor."""

    def __init__(
        self,
        model,
        tokenizer,
        template,
        device: torch.device | str = "cpu",
        *,
        stop_words: list[str] | None = None,
    ):
        """`stop_words`: those saved with the checkpoint (default: the template's)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.device = torch.device(device)
        self.processor = model.vision_tower.processor if model.vision_tower is not None else None
        # A text-only model never sees an image span; the Encoder still wants a positive span length.
        rule = getattr(model, "image_tokens", model.num_image_tokens)
        self.encoder = Encoder(
            tokenizer, template, max_length=None, image_tokens=max(1, rule) if isinstance(rule, int) else rule
        )
        stop_words = template.stop_words if stop_words is None else stop_words
        if list(stop_words) != list(template.stop_words):
            log.warning(
                "stop words %s saved with the checkpoint differ from template %r's %s; using the saved ones",
                stop_words,
                template.name,
                template.stop_words,
            )
        self.stop_ids, self.stop_strings = split_stop_words(tokenizer, stop_words)
        # Matched on the tokens' text, so also inside a larger token (byte-level BPE's ".\n" for "\n"). Built
        # once: generate(stop_strings=...) would rebuild it from the whole vocabulary on every call.
        self.stop_criteria = StoppingCriteriaList(
            [StopStringCriteria(tokenizer, self.stop_strings)] if self.stop_strings else []
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        load_4bit: bool = False,
        device: str | None = None,
        overrides: dict[str, str | None] | None = None,
    ) -> Assistant:
        """`checkpoint`: a stage output or an hf-llava / merged-llm export folder; `overrides`: base model
        folders of a stage output ("model.llm", "model.vision.model"), which an export does not take."""
        if folder_kind(checkpoint) == "stage":
            stage = load_stage(checkpoint, load_in_4bit=load_4bit, overrides=overrides)
        else:
            if given := sorted(k for k, v in (overrides or {}).items() if v):
                flags = ", ".join(f"--{k}" for k in given)
                raise ValueError(
                    f"{checkpoint}: an export holds its whole model; {flags} apply to stage outputs"
                )
            stage = load_export(checkpoint, load_in_4bit=load_4bit)
        model = stage.model
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if load_4bit:
            # bitsandbytes already placed the quantized LLM; the tower and projector follow it.
            for part in (model.vision_tower, model.projector):
                if part is not None:
                    part.to(device)
        else:
            model.to(device)
        return cls(model, stage.tokenizer, stage.template, device, stop_words=stage.stop_words)

    @property
    def has_vision(self) -> bool:
        return self.model.vision_tower is not None

    # -- prompts -------------------------------------------------------------------------------------------
    def _image_args(self, images: int | Sequence[Image.Image]) -> tuple[int, Sizes]:
        """(number of images, their (height, width) when their token counts depend on them) of `images`: the
        conversation's images, or only how many there are (enough when every image has the same count)."""
        if isinstance(images, int):
            return images, None
        sizes = [(img.height, img.width) for img in images] if self.encoder.anyres else None
        return len(images), sizes

    def _conversation(self, messages: list[Message], n_images: int) -> Conversation:
        conv = Conversation(messages=list(messages), images=["<in memory>"] * n_images)
        if n_images and not self.has_vision:
            raise ValueError("this checkpoint has no vision tower (text-only); it cannot take an image")
        if conv.num_image_markers() != n_images:
            raise ValueError(
                f"the conversation has {conv.num_image_markers()} {IMAGE_TOKEN} marker(s) but {n_images} image(s)"
            )
        return conv

    def prompt_ids(self, messages: list[Message], images: int | Sequence[Image.Image]) -> list[int]:
        """Prompt ids, each image expanded to its tokens. `images`: the conversation's images (an
        any-resolution model counts each by its size), or how many there are (a fixed count per image)."""
        n_images, sizes = self._image_args(images)
        return self.encoder.encode_prompt(self._conversation(messages, n_images), sizes)

    def answer_start_ids(
        self, messages: list[Message], images: int | Sequence[Image.Image], answer: str
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, ids of `answer` as the start of the assistant turn); `images` as for `prompt_ids`.

        The answer is written as the template writes an assistant turn (e.g. vicuna's " Yes" after
        "ASSISTANT:") and tokenized together with the prompt, so its first token is the one the model would
        generate there: sentencepiece, for one, encodes "Yes" alone as "▁Yes" but "\\nYes" without the "▁".
        """
        n_images, sizes = self._image_args(images)
        conv = self._conversation(messages, n_images)
        bos, eos = self.encoder.bos, self.encoder.eos
        prompt_text = self.template.render(conv, bos=bos, eos=eos, add_generation_prompt=True)
        answered = Conversation([*conv.messages, Message("assistant", answer)], images=conv.images)
        full_text = self.template.render(answered, bos=bos, eos=eos)
        core = answer.strip()
        found = full_text.find(core, len(prompt_text)) if full_text.startswith(prompt_text) else -1
        if not core or found < 0:
            raise ValueError(
                f"template {self.template.name!r}: cannot place answer {answer!r} after the generation prompt"
            )
        prompt = self.encoder.encode_prompt(conv, sizes)
        # Whole-text tokenization, as for the prompt itself.
        full = self.encoder.encode_text(full_text[: found + len(core)], sizes)
        if full[: len(prompt)] != prompt or len(full) == len(prompt):
            raise ValueError(
                f"answer {answer!r} merges with the end of the {self.template.name!r} generation prompt when "
                f"tokenized (prompt ends {prompt[-3:]}, prompt+answer has {full[len(prompt) - 3 :]})"
            )
        return prompt, full[len(prompt) :]

    def _left_padded(self, rows: list[list[int]], images: list[list]) -> dict[str, torch.Tensor]:
        """inputs_embeds, attention_mask and position_ids (0 at each row's first real token)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        pixels = pixel_inputs(self.processor, [img for per in images for img in per])
        counts = torch.tensor([len(per) for per in images], dtype=torch.long)
        with torch.no_grad():
            embeds = self.model.embed(
                ids.to(self.device),
                pixels["pixel_values"].to(self.device) if pixels else None,
                counts,
                pixels.get("image_sizes"),
            )
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "inputs_embeds": embeds,
            "attention_mask": mask.to(self.device),
            "position_ids": position_ids.to(self.device),
        }

    def _logits(self, rows: list[list[int]], images: list[list], keep: int) -> torch.Tensor:
        """fp32 logits [batch, keep, vocab] of the last `keep` positions of left-padded rows (all positions of a
        large vocabulary would cost batch x width x vocab floats)."""
        with torch.no_grad():
            out = self.model.llm(**self._left_padded(rows, images), use_cache=False, logits_to_keep=keep)
        return out.logits.float()

    def prompt_logits(self, batch: list[Prompt]) -> torch.Tensor:
        """fp32 logits [batch, vocab] of the first answer token after each prompt."""
        rows = [self.prompt_ids(msgs, imgs) for msgs, imgs in batch]
        return self._logits(rows, [imgs for _, imgs in batch], keep=1)[:, -1]

    # -- generation ----------------------------------------------------------------------------------------
    def generate_messages(
        self,
        batch: list[Prompt],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_text: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Answer a batch of conversations (each ending with a user turn) with their images.

        temperature 0 is greedy. `on_text` (a batch of one only) receives the answer as it grows, in pieces
        whose concatenation is the returned answer.
        """
        if on_text is not None and len(batch) != 1:
            raise ValueError(f"streaming answers one conversation at a time, got a batch of {len(batch)}")
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise ValueError(
                f"need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1; got {temperature}, {top_p}, "
                f"{max_new_tokens}"
            )
        if not batch:
            return []
        rows = [self.prompt_ids(msgs, imgs) for msgs, imgs in batch]
        inputs = self._left_padded(rows, [imgs for _, imgs in batch])
        sampling = temperature > 0
        with torch.no_grad():
            # Every decoding knob is set here, so a checkpoint's generation_config.json (repetition penalty,
            # sampling defaults) cannot change what chat and evaluation do.
            out = self.model.llm.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else 1.0,
                top_p=top_p if sampling else 1.0,
                top_k=0 if sampling else None,  # 0: no top-k cut, top_p alone decides
                num_beams=1,
                repetition_penalty=1.0,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                stopping_criteria=self.stop_criteria,
                streamer=_TextStream(self, on_text) if on_text is not None else None,
            )
        # With inputs_embeds only, generate returns just the new tokens.
        return [self.answer_text(row.tolist()).strip() for row in out]

    def answer_text(self, ids: list[int]) -> str:
        """Decoded answer, cut before the first stop token or stop string (not stripped)."""
        stops = set(self.stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        for word in self.stop_strings:
            text = text.split(word, 1)[0]
        return text

    def generate(
        self, queries: list[Query], *, max_new_tokens: int = 32, batch_size: int | None = None
    ) -> list[str]:
        """Greedy answers to single-turn queries; all in one batch unless `batch_size` is given."""
        answers: list[str] = []
        for chunk in _chunks(queries, batch_size):
            answers += self.generate_messages(
                [self._as_messages(q) for q in chunk], max_new_tokens=max_new_tokens
            )
        return answers

    def option_logprobs(
        self, queries: list[Query], options: list[str], *, batch_size: int | None = None
    ) -> list[list[float]]:
        """log P(option | query) for each option as the start of the assistant answer (no generation).

        One row per (query, option); a query's image is encoded once per option row.
        """
        if not options:
            raise ValueError("option_logprobs needs at least one option")
        scores: list[list[float]] = []
        for chunk in _chunks(queries, batch_size):
            rows, images, spans = [], [], []
            for q in chunk:
                msgs, imgs = self._as_messages(q)
                for option in options:
                    prompt, answer = self.answer_start_ids(msgs, imgs, option)
                    rows.append(prompt + answer)
                    images.append(imgs)
                    spans.append(answer)
            # Rows are left-padded: an answer of n tokens ends the row, predicted by the n positions before.
            keep = max(len(a) for a in spans) + 1
            logp = torch.log_softmax(self._logits(rows, images, keep), dim=-1)
            flat = []
            for i, answer in enumerate(spans):
                n = len(answer)
                picked = logp[i, -n - 1 : -1].gather(-1, torch.tensor(answer, device=logp.device)[:, None])
                flat.append(float(picked.sum()))
            scores += [flat[k : k + len(options)] for k in range(0, len(flat), len(options))]
        return scores

    @staticmethod
    def _as_messages(q: Query) -> Prompt:
        return [Message("user", q.user_text())], q.images


def _chunks(items: list, size: int | None) -> list[list]:
    if size is not None and size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {size}")
    size = size or max(len(items), 1)
    return [items[i : i + size] for i in range(0, len(items), size)]


def split_stop_words(tokenizer, stop_words: list[str]) -> tuple[list[int], list[str]]:
    """(ids that end generation: single-token stop words + eos, stop words matched on text).

    Every stop word that shows in decoded text is matched on text, single-token ones too: a byte-level BPE
    (Qwen2, Llama 3, DeepSeek) has "\\n" as one token but also merges it into others (".\\n"), which the id check
    misses. Special tokens vanish from the decoded answer, so a special stop token is matched by id only, and
    one inside a multi-token stop word could never match (the Encoder checks that the template's markers are
    single ids)."""
    ids: set[int] = set()
    strings: list[str] = []
    special = set(tokenizer.all_special_ids)
    for word in stop_words:
        enc = tokenizer.encode(word, add_special_tokens=False)
        has_special = bool(set(enc) & special)
        if has_special and len(enc) > 1:
            raise ValueError(
                f"stop word {word!r} is {len(enc)} tokens {enc}, some special: it cannot be matched"
            )
        if len(enc) == 1:
            ids.add(enc[0])
        if not has_special:
            strings.append(word)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos and the template no single-token stop word")
    return sorted(ids), strings


class _TextStream(BaseStreamer):
    """Hands out the growing answer of a one-row generation. It holds back what may still change: a partial
    UTF-8 character, the start of a stop string, trailing whitespace (the final answer is stripped).

    It decodes the whole answer at each step: transformers' TextStreamer decodes line by line, and a sentencepiece
    tokenizer with a dummy prefix (Llama 2's) drops the space that starts a line decoded alone."""

    def __init__(self, assistant: Assistant, on_text: Callable[[str], None]):
        self.assistant, self.on_text = assistant, on_text
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt's input_ids (empty with inputs_embeds)
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.assistant.answer_text(self.ids).strip()
        if not final:
            text = text.rstrip("\ufffd")
            for word in self.assistant.stop_strings:
                for k in range(len(word) - 1, 0, -1):
                    if text.endswith(word[:k]):
                        text = text[:-k].rstrip()
                        break
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text
        elif final and text != self.sent:
            log.warning("streamed text %r is not a prefix of the answer %r", self.sent, text)


def load_assistant(
    checkpoint: str,
    *,
    load_4bit: bool = False,
    device: str | None = None,
    overrides: dict[str, str | None] | None = None,
) -> Assistant:
    """A stage output or an export folder; `overrides`: base model paths for `load_stage` ("model.llm",
    "model.vision.model")."""
    return Assistant.load(checkpoint, load_4bit=load_4bit, device=device, overrides=overrides)
