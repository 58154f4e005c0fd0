"""Projectors against transformers' LlavaMultiModalProjector and a naive erf-GELU MLP."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava_ft.model.projector import build_projector

IN_DIM, OUT_DIM = 24, 40


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def test_mlp2x_gelu_equals_hf_llava_projector():
    torch.manual_seed(0)
    ours = build_projector("mlp2x_gelu", IN_DIM, OUT_DIM)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=IN_DIM, num_attention_heads=4),
        text_config=LlamaConfig(hidden_size=OUT_DIM, num_attention_heads=4, num_key_value_heads=4),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
    )
    reference = LlavaMultiModalProjector(config)
    # Loads strictly with no renaming: the export maps `projector.*` to `multi_modal_projector.*` as is.
    reference.load_state_dict(ours.state_dict(), strict=True)
    features = 3 * torch.randn(2, 5, IN_DIM)  # wide range, where erf and tanh GELU differ
    torch.testing.assert_close(ours(features), reference(features), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kind", "depth"), [("linear", 1), ("mlp1x_gelu", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)]
)
def test_projectors_equal_naive_mlp(kind, depth):
    torch.manual_seed(1)
    projector = build_projector(kind, IN_DIM, OUT_DIM)
    weights = [
        (getattr(projector, f"linear_{i}").weight, getattr(projector, f"linear_{i}").bias)
        for i in range(1, depth + 1)
    ]
    assert sorted(name for name, _ in projector.named_parameters()) == sorted(
        f"linear_{i}.{kind}" for i in range(1, depth + 1) for kind in ("weight", "bias")
    )
    assert weights[0][0].shape == (OUT_DIM, IN_DIM)
    x = 3 * torch.randn(4, IN_DIM)
    expected = x @ weights[0][0].T + weights[0][1]
    for weight, bias in weights[1:]:
        expected = erf_gelu(expected) @ weight.T + bias
    torch.testing.assert_close(projector(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["identity", "mlp2x_relu", "mlp0x_gelu", "mlp2x_gelu ", "MLP2x_gelu"])
def test_unknown_kind_is_rejected(kind):
    with pytest.raises(ValueError, match="unknown projector kind"):
        build_projector(kind, IN_DIM, OUT_DIM)
