"""The LLaVA model: vision tower -> projector -> features scattered into the LLM's input embeddings.

`<image>` is expanded into as many placeholder ids (IMAGE_TOKEN_INDEX) as the image has features by the
tokenizer step, so merging is a masked scatter with count checks, as in transformers' Llava. An any-resolution
image (`image_sizes` given) is several tower views, projected then packed as LLaVA-NeXT packs them
(model/anyres.py), so its count depends on its size. Labels stay aligned with input_ids; the
shift happens once: inside the HF causal LM (loss "plain"), or in `model/loss.py` (chunked / fused), which
takes the decoder's hidden states so the full-vocabulary logits are never built.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_ft.constants import IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import AnyresGeometry, ImageTokens
from llava_ft.model.attention import PACKED_SDPA, packed_spans, plan_packed
from llava_ft.model.loss import LossMode, causal_lm_loss, is_plain_linear


class LlavaModel(nn.Module):
    # Tells the Trainer our loss shifts labels, so it counts `num_items_in_batch` over labels[..., 1:] as HF does.
    loss_type = "ForCausalLM"

    def __init__(
        self,
        llm: nn.Module,
        vision_tower: nn.Module | None = None,
        projector: nn.Module | None = None,
        *,
        loss: LossMode = "plain",
        loss_chunk_size: int = 1024,
    ):
        super().__init__()
        self.llm = llm
        self.vision_tower = vision_tower
        self.projector = projector
        # Mixed image/text micro-batches: under ZeRO-3 every rank must call the sharded vision modules in the
        # same order, so a text-only batch runs a dummy image through them.
        self.dummy_image_when_text_only = True
        self.loss = loss
        self.loss_chunk_size = loss_chunk_size

    @property
    def config(self):
        # The Trainer and peft read `model.config`; the LLM's is the meaningful one.
        return self.llm.config

    @property
    def num_image_tokens(self) -> int:
        """Tokens of one tower view (an image's count in fixed mode)."""
        return 0 if self.vision_tower is None else self.vision_tower.num_tokens

    @property
    def image_tokens(self) -> ImageTokens:
        """What an image costs in tokens: the tower's count per image, or the any-resolution geometry of its
        processor (the count then depends on the image's size)."""
        if self.vision_tower is None:
            return 0
        processor = getattr(self.vision_tower, "processor", None)
        return processor.geometry if getattr(processor, "anyres", False) else self.vision_tower.num_tokens

    def input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def causal_lm(self) -> nn.Module:
        """The transformers causal LM itself (inside a peft wrapper, whose LoRA layers sit in its modules)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_views, 3, H, W] -> [n_views, N, hidden of the LLM]."""
        return self._encode(pixel_values)

    def image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Each image's features [tokens, hidden of the LLM], in order: one view per image without
        `image_sizes`; with `image_sizes` ([n_images, 2], height and width) the any-resolution views of each image
        (`pixel_values` holds them all, base view first) packed as LLaVA-NeXT packs them."""
        rule = self.image_tokens
        if image_sizes is None:
            if isinstance(rule, AnyresGeometry):
                raise ValueError("this model tiles images (any-resolution): image_sizes are needed")
            return list(self._encode(pixel_values))
        if not isinstance(rule, AnyresGeometry):
            raise ValueError("image_sizes given, but this model's tower has no any-resolution processor")
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        views = sum(rule.num_views(h, w) for h, w in sizes)
        if views != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} views but the {len(sizes)} image(s) of image_sizes "
                f"are tiled to {views}"
            )
        return self._encode(pixel_values, sizes, rule)

    def _encode(
        self,
        pixel_values: torch.Tensor,
        sizes: list[tuple[int, int]] | None = None,
        geometry: AnyresGeometry | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        tower_dtype = next(self.vision_tower.parameters()).dtype
        features = self.vision_tower(pixel_values.to(tower_dtype))
        proj_dtype = next(self.projector.parameters()).dtype
        if sizes is None:
            return self.projector(features.to(proj_dtype))
        return self.projector(features.to(proj_dtype), sizes, geometry)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features at the image positions, images in row order. `image_counts`
        (images per row, as the collators give it) is checked per row: batch totals alone can match while one
        row's images land in another. `image_sizes` ([n_images, 2]): any-resolution images, whose views
        `pixel_values` holds (see `image_features`)."""
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        embed_layer = self.input_embeddings()
        # Placeholders are not vocabulary ids: look up id 0 there and overwrite with image features.
        embeds = embed_layer(input_ids.masked_fill(image_mask, 0))
        n_positions = int(image_mask.sum())
        if pixel_values is not None and pixel_values.shape[0] > 0:
            if self.vision_tower is None:
                raise ValueError("the batch has images but this model has no vision tower")
            features = self.image_features(pixel_values, image_sizes)
            lengths = [f.shape[0] for f in features]
            if sum(lengths) != n_positions:
                raise ValueError(
                    f"image features and image tokens do not match: {_tokens_text(lengths)} = {sum(lengths)} "
                    f"features, but input_ids hold {n_positions} image positions"
                )
            if image_counts is not None:
                _check_rows(image_mask.sum(dim=1).cpu().tolist(), image_counts.cpu().tolist(), lengths)
            flat = torch.cat(features).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), flat)
        elif n_positions:
            raise ValueError(f"input_ids hold {n_positions} image positions but no pixel_values were given")
        elif self.vision_tower is not None and self.training and self.dummy_image_when_text_only:
            embeds = embeds + 0.0 * self._dummy_features(embeds.device).mean().to(embeds.dtype)
        return embeds

    def _dummy_features(self, device: torch.device) -> torch.Tensor:
        # One tower-sized blank image through every vision module, any-resolution packing (the newline) too.
        size = self.vision_tower.image_size
        rule = self.image_tokens
        if not isinstance(rule, AnyresGeometry):
            return self._encode(torch.zeros(1, 3, size, size, device=device))
        views = torch.zeros(rule.num_views(size, size), 3, size, size, device=device)
        return self._encode(views, [(size, size)], rule)[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ):
        embeds = self.embed(
            input_ids, pixel_values, kwargs.pop("image_counts", None), kwargs.pop("image_sizes", None)
        )
        # use_cache=False always in training: with a cache, packed samples would attend to each other.
        inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids}
        packed = position_ids is not None and attention_mask is None  # PackedCollator's rows
        if packed and self.causal_lm().config._attn_implementation == PACKED_SDPA:
            # Planned once here rather than in each layer.
            kwargs["packed_plan"] = plan_packed(
                packed_spans(position_ids), position_ids.shape[1], embeds.device
            )
        if labels is None or self.loss == "plain":
            if labels is not None and num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return self.llm(**inputs, labels=labels, use_cache=False, **kwargs)
        # Loss from hidden states: the decoder runs without the LM head; logits are never returned.
        causal_lm = self.causal_lm()
        for name in ("final_logit_softcapping", "logit_scale"):
            if getattr(causal_lm.config, name, None) is not None:
                raise ValueError(
                    f"model.loss {self.loss}: the LLM's config sets {name}; use model.loss plain"
                )
        out = causal_lm.get_decoder()(**inputs, use_cache=False, **kwargs)
        head = causal_lm.get_output_embeddings()
        # A LoRA on lm_head (chosen after the loss was resolved) is no dense weight for the fused kernel.
        mode = "chunked" if self.loss == "fused" and not is_plain_linear(head) else self.loss
        loss = causal_lm_loss(
            out.last_hidden_state,
            head,
            labels,
            mode=mode,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.loss_chunk_size,
        )
        return CausalLMOutputWithPast(loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False
    ):
        """Checkpoint the LLM's decoder layers (the Trainer calls this; it acts only in train mode)."""
        self.llm.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs,
            every_n_layers=every_n_layers,
            offload=offload,
        )
        # Frozen embeddings give inputs without grad; checkpointed blocks then need inputs that require it.
        self.llm.enable_input_require_grads()


def _tokens_text(lengths: list[int], shown: int = 6) -> str:
    """Images' token counts for an error line: "2 image(s) x 576 tokens", or when they differ
    "3 image(s) of 1200 + 950 + 700 tokens" (the first `shown`, then how many more)."""
    if len(set(lengths)) <= 1:
        return f"{len(lengths)} image(s) x {lengths[0] if lengths else 0} tokens"
    more = f" + ... ({len(lengths) - shown} more)" if len(lengths) > shown else ""
    return f"{len(lengths)} image(s) of {' + '.join(map(str, lengths[:shown]))}{more} tokens"


def _check_rows(positions: list[int], counts: list[int], lengths: list[int]) -> None:
    """Each row's image positions against the tokens of its images (`counts` per row, in order)."""
    if len(positions) != len(counts) or sum(counts) != len(lengths):
        raise ValueError(
            f"image_counts {counts} (images per row) do not fit a batch of {len(positions)} row(s) and "
            f"{len(lengths)} image(s)"
        )
    first = 0
    for row, (n_positions, count) in enumerate(zip(positions, counts)):
        own = lengths[first : first + count]
        first += count
        if sum(own) != n_positions:
            raise ValueError(
                f"batch row {row} holds {n_positions} image positions but {_tokens_text(own)} = {sum(own)}"
            )
