"""Vision -> language projector (LLaVA's `mm_projector`).

Submodules are named `linear_1 .. linear_N` with one shared `act`, exactly as transformers'
`LlavaMultiModalProjector`, so an mlp2x_gelu projector exports by prefixing `multi_modal_projector.`.
With any-resolution tiling it also holds LLaVA-NeXT's `image_newline` (the embedding closing each row of tile
features), so that trains, saves and loads with the projector; weights of a projector trained without it load
with the newline left at its initial value.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from llava_ft.data.anyres import AnyresGeometry
from llava_ft.model.anyres import pack_image
from llava_ft.model.names import projector_depth

log = logging.getLogger("llava_ft")


class MLPProjector(nn.Module):
    """`depth` linear layers with exact (erf) GELU between them; depth 1 is a single linear map. `newline`: an
    `image_newline` parameter of `out_dim` (the LLM's hidden size), initialised as LlavaNext's."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, *, newline: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        self.depth = depth
        self.linear_1 = nn.Linear(in_dim, out_dim)
        # nn.GELU() is the erf form, the same as HF Llava's projector_hidden_act="gelu".
        self.act = nn.GELU()
        for i in range(2, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(out_dim, out_dim))
        if newline:
            self.image_newline = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim))
            self.register_load_state_dict_pre_hook(_keep_newline_missing_from_fixed_weights)

    def forward(
        self,
        features: torch.Tensor,
        image_sizes: list[tuple[int, int]] | None = None,
        geometry: AnyresGeometry | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """[n_views, N, in_dim] -> [n_views, N, out_dim]; with `image_sizes` ((height, width) per image) and
        `geometry`, each image's views packed with the newline: a list of [tokens of the image, out_dim].
        Packed here, so the newline is used in its own module's forward, where ZeRO-3 gathers a module's
        parameters."""
        x = self.linear_1(features)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        if image_sizes is None:
            return x
        views = [geometry.num_views(h, w) for h, w in image_sizes]
        return [
            pack_image(v, geometry, h, w, self.image_newline)
            for v, (h, w) in zip(x.split(views), image_sizes, strict=True)
        ]


def _keep_newline_missing_from_fixed_weights(module: MLPProjector, state_dict: dict, prefix: str, *_) -> None:
    # LLaVA-NeXT's recipe: a projector pretrained at one view per image, then any-resolution fine-tuning, which
    # starts the newline from its initial value. Weights without any linear layer stay a missing-keys error.
    key = prefix + "image_newline"
    if key not in state_dict and prefix + "linear_1.weight" in state_dict:
        log.warning(
            "projector weights without image_newline (trained without anyres): the newline starts new"
        )
        state_dict[key] = module.image_newline.detach().clone()


def build_projector(kind: str, in_dim: int, out_dim: int, *, newline: bool = False) -> nn.Module:
    """`linear`, `mlp2x_gelu` (LLaVA-1.5) or `mlpNx_gelu` (N linear layers, N >= 1); `newline` adds the
    any-resolution `image_newline`."""
    return MLPProjector(in_dim, out_dim, depth=projector_depth(kind), newline=newline)
