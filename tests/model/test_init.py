"""From-scratch initialisation: the decoder's attentions start out matching a point to its own position."""

from __future__ import annotations

import pytest
import torch

from sam_train.config import load_config
from sam_train.model import Sam, build_sam
from sam_train.model.init import decoder_attentions, position_matching_attention
from sam_train.model.transformer import Attention
from sam_train.train import build_model


@torch.no_grad()
def cells_found(model: Sam, attention: Attention) -> float:
    """Share of probed image cells where a point's position encoding, as a query, scores highest
    against the key of its own cell's position encoding."""
    encoder = model.prompt_encoder
    keys = attention.k_proj(encoder.get_dense_pe()[0].flatten(1).T)  # cells x C, row-major
    side = encoder.image_embedding_size[0]
    stride = model.image_size / side
    probed = range(0, side * side, 7)
    found = 0
    for cell in probed:
        row, col = divmod(cell, side)
        centre = torch.tensor([[[(col + 0.5) * stride, (row + 0.5) * stride]]])
        query = attention.q_proj(encoder.pe_layer.forward_with_coords(centre, (model.image_size,) * 2)[0])
        found += int((query @ keys.T).argmax()) == cell
    return found / len(probed)


@pytest.mark.parametrize("seed", [0, 1])
def test_matched_projections_find_the_prompted_position_where_default_init_does_not(seed):
    torch.manual_seed(seed)
    model = build_sam("tiny")
    attentions = decoder_attentions(model)
    assert len(attentions) == 7  # 2 blocks x (self, token->image, image->token) + the final token->image
    assert max(cells_found(model, a) for a in attentions) < 0.2  # PyTorch's default: no position matching
    query_weights = [a.q_proj.weight.clone() for a in attentions]

    assert position_matching_attention(model, 4.0) == 7
    for attention, before in zip(attentions, query_weights):
        assert torch.equal(attention.k_proj.weight, attention.q_proj.weight)
        assert torch.allclose(attention.q_proj.weight, 2.0 * before)
        assert cells_found(model, attention) >= 0.9


def test_fit_applies_it_from_scratch_only():
    scratch = load_config("fit", ["model.qk_match_init=4.0"]).model
    assert all(torch.equal(a.k_proj.weight, a.q_proj.weight) for a in decoder_attentions(build_model(scratch)))
    builtin = load_config("fit", ["model.qk_match_init=4.0", "model.pretrained=true"]).model
    assert torch.equal(
        build_model(builtin).state_dict()["mask_decoder.transformer.layers.0.self_attn.k_proj.weight"],
        build_sam("tiny", pretrained=True).state_dict()["mask_decoder.transformer.layers.0.self_attn.k_proj.weight"],
    )
    with pytest.raises(ValueError, match="positive scale"):
        position_matching_attention(build_sam("tiny"), 0.0)
