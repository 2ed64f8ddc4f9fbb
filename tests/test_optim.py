"""Optimiser recipe: every parameter in one group, no decay on norms/biases/positions, layer-wise lr, schedules."""

from __future__ import annotations

import pytest
import torch

from sam_train.model import build_sam
from sam_train.optim import lr_multiplier, parameter_groups


def test_groups_cover_every_parameter_once_with_the_right_decay_and_lr():
    model = build_sam("tiny")
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    by_name = {n: g for g in groups for n in g["names"]}
    for name in ("image_encoder.blocks.0.norm1.weight", "image_encoder.blocks.0.attn.qkv.bias",
                 "image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h", "mask_decoder.iou_token.weight"):
        expected = 0.0 if "iou_token" not in name else 0.1
        assert by_name[name]["weight_decay"] == expected, name
    assert by_name["image_encoder.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.1
    # 4 blocks: embeddings at 0.5^5, block i at 0.5^(4-i), neck and decoder at full lr.
    assert by_name["image_encoder.patch_embed.proj.weight"]["lr"] == pytest.approx(1e-3 * 0.5**5)
    assert by_name["image_encoder.blocks.3.mlp.fc1.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_name["image_encoder.neck.0.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["mask_decoder.iou_token.weight"]["lr"] == pytest.approx(1e-3)
    torch.optim.AdamW(groups)  # the groups are a valid AdamW configuration


def test_frozen_parameters_are_left_out():
    model = build_sam("tiny")
    model.image_encoder.requires_grad_(False)
    names = [n for g in parameter_groups(model, 1e-3, 0.1, 0.8) for n in g["names"]]
    assert names and not any(n.startswith("image_encoder.") for n in names)


def test_step_schedule_warms_up_then_divides_by_ten_at_two_thirds_and_26_27ths():
    f = lr_multiplier("step", total_steps=2700, warmup_steps=250, milestones=(0.666667, 0.962963), gamma=0.1)
    assert f(0) == pytest.approx(1 / 250) and f(249) == 1.0 and f(250) == 1.0
    assert f(1799) == 1.0 and f(1800) == pytest.approx(0.1)
    assert f(2599) == pytest.approx(0.1) and f(2600) == pytest.approx(0.01)


def test_cosine_schedule_and_bad_name():
    f = lr_multiplier("cosine", total_steps=1100, warmup_steps=100)
    assert f(100) == pytest.approx(1.0) and f(600) == pytest.approx(0.5) and f(1100) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="'step' or 'cosine'"):
        lr_multiplier("linear", 10, 1)


def test_a_time_cooldown_anneals_to_zero_inside_the_budget_and_leaves_the_steps_before_it_alone():
    spent = [0.0]
    cooled = lr_multiplier("cosine", total_steps=1100, warmup_steps=100, cooldown=0.2, budget_spent=lambda: spent[0])
    plain = lr_multiplier("cosine", total_steps=1100, warmup_steps=100)
    for value in (0.0, 0.5, 0.8):
        spent[0] = value
        assert cooled(50) == pytest.approx(plain(50)) and cooled(300) == pytest.approx(plain(300))
    spent[0] = 0.9  # half-way through the last fifth: half the step-driven lr
    assert cooled(300) == pytest.approx(0.5 * plain(300)) and cooled(50) == pytest.approx(0.5 * plain(50))
    spent[0] = 1.0
    assert cooled(300) == 0.0
    with pytest.raises(ValueError, match="cooldown"):
        lr_multiplier("cosine", 10, 1, cooldown=1.0)
