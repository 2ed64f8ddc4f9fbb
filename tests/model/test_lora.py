"""LoRA on the encoder attention: starts as the identity, merges back into plain official-layout weights."""

from __future__ import annotations

import pytest
import torch

from sam_train.model import build_sam, merge_lora
from sam_train.model.lora import LoRALinear, add_lora
from tests.conftest import perturb_all_weights_


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return perturb_all_weights_(build_sam("tiny"), seed=7).eval()


def trained_like_(model: torch.nn.Module, seed: int) -> None:
    """Give every LoRA update a nonzero B, as training would, so merging has something to fold in."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=generator) * 0.05)


def test_fresh_lora_computes_exactly_what_was_loaded_and_trains_only_a_and_b():
    model = tiny_model()
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        before = model.encode_image(images)
    assert add_lora(model.image_encoder, ["qkv", "proj"], rank=4, alpha=8, dropout=0.1) == 2 * 4  # 4 blocks
    wrapped = model.image_encoder.blocks[0].attn.qkv
    assert isinstance(wrapped, LoRALinear) and wrapped.scale == 2.0
    assert not wrapped.base.weight.requires_grad and wrapped.lora_a.requires_grad and wrapped.lora_b.requires_grad
    assert wrapped.lora_a.abs().sum() > 0 and not wrapped.lora_b.any()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), before)


def test_merge_gives_the_unmerged_outputs_with_official_keys():
    model = tiny_model()
    reference_keys = list(model.state_dict())
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        original = model.encode_image(images)
    add_lora(model.image_encoder, ["qkv", "proj"], rank=4, alpha=8, dropout=0.0)
    trained_like_(model, seed=1)
    assert any(".attn.qkv.lora_a" in k for k in model.state_dict())
    with torch.no_grad():
        adapted = model.encode_image(images)
        merge_lora(model)
        merged = model.encode_image(images)
    assert (adapted - original).abs().max() > 1e-2, "the LoRA update must change the outputs for this test to mean anything"
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == reference_keys
    assert type(model.image_encoder.blocks[0].attn.qkv) is torch.nn.Linear


def test_merge_keeps_a_half_precision_base_in_its_dtype():
    base = torch.nn.Linear(16, 48).to(torch.bfloat16)
    layer = LoRALinear(base, rank=2, alpha=2, dropout=0.0)
    with torch.no_grad():
        layer.lora_b.fill_(0.1)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    expected = layer(x).float()
    merged = layer.merged()
    assert merged.weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged(x).float(), expected, atol=0.05, rtol=0.02)


def test_unknown_target_names_the_linear_layers_there_are():
    message = r"'q_proj' is not a Linear layer of blocks.0.attn; its Linear layers: \['qkv', 'proj'\]"
    with pytest.raises(ValueError, match=message):
        add_lora(build_sam("tiny").image_encoder, ["q_proj"], rank=4, alpha=8, dropout=0.0)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(torch.nn.Linear(4, 4), rank=0, alpha=1, dropout=0.0)
