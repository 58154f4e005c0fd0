"""Vision -> language projector (LLaVA's `mm_projector`).

Submodules are named `linear_1 .. linear_N` with one shared `act`, exactly as transformers'
`LlavaMultiModalProjector`, so an mlp2x_gelu projector exports by prefixing `multi_modal_projector.`.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_ft.model.names import projector_depth


class MLPProjector(nn.Module):
    """`depth` linear layers with exact (erf) GELU between them; depth 1 is a single linear map."""

    def __init__(self, in_dim: int, out_dim: int, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        self.depth = depth
        self.linear_1 = nn.Linear(in_dim, out_dim)
        # nn.GELU() is the erf form, the same as HF Llava's projector_hidden_act="gelu".
        self.act = nn.GELU()
        for i in range(2, depth + 1):
            self.add_module(f"linear_{i}", nn.Linear(out_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(features)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear`, `mlp2x_gelu` (LLaVA-1.5) or `mlpNx_gelu` (N linear layers, N >= 1)."""
    return MLPProjector(in_dim, out_dim, depth=projector_depth(kind))
