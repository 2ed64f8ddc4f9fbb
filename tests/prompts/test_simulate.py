"""Prompt simulation: points inside masks, noisy boxes, corrective clicks from the error region, schedules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir

from sam_train.config import config_dir
from sam_train.prompts import (
    PromptConfig,
    corrective_clicks,
    first_point,
    loss_round_flags,
    mask_boxes,
    noisy_boxes,
    round_schedule,
)
from sam_train.prompts.protocol import next_click


def prompt_config(name: str) -> PromptConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return PromptConfig(**compose(config_name=f"prompts/{name}").prompts)


def ring_masks(n: int = 64, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for _ in range(n):
        cy, cx = torch.randint(8, size - 8, (2,), generator=g).tolist()
        r = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
        masks.append((r < 7) & (r > 3))  # a ring: its centre is not in the mask
    return torch.stack(masks)


def test_configs_give_the_papers_schedules():
    sam, sam2 = prompt_config("sam"), prompt_config("sam2")
    assert sam.rounds == 11 and sam2.rounds == 8 and sam2.gt_click_prob == 0.1
    kinds = round_schedule(sam, torch.Generator().manual_seed(1))
    assert kinds.count("click") == 8 and kinds.count("empty") == 2 and kinds[-1] == "empty"
    positions = {round_schedule(sam, torch.Generator().manual_seed(s)).index("empty") for s in range(40)}
    assert len(positions) > 3, "the first empty round moves around"
    assert round_schedule(sam2) == ["click"] * 7


def test_loss_rounds_keep_the_first_and_draw_the_rest_uniformly():
    sam = prompt_config("sam")
    assert loss_round_flags(sam) == [True] * 11  # 0: every round, the paper's recipe
    three = dataclasses.replace(sam, loss_rounds=3)
    draws = [loss_round_flags(three, torch.Generator().manual_seed(s)) for s in range(300)]
    assert all(len(d) == 11 and d[0] and sum(d) == 3 for d in draws)
    picked = torch.tensor(draws, dtype=torch.float)[:, 1:].mean(0)  # each later round: 2 of 10, so 0.2
    assert picked.min() > 0.12 and picked.max() < 0.28, picked
    for bad in (1, 12, -1):
        with pytest.raises(ValueError, match="loss_rounds must be 0"):
            dataclasses.replace(sam, loss_rounds=bad)


def test_a_curriculum_shortens_only_the_sessions_length_and_only_before_its_share_of_training():
    full = dataclasses.replace(prompt_config("centre_clicks"), early_corrective_rounds=0, early_until=0.7)
    assert full.rounds == 5
    early = full.at_progress(0.0)
    assert early.rounds == 1 and full.at_progress(0.699).rounds == 1
    # clicks, boxes, noise: as configured
    assert early == dataclasses.replace(full, corrective_rounds=0, early_until=0.0)
    assert full.at_progress(0.7) is full and full.at_progress(1.0) is full
    paper = prompt_config("sam")
    assert paper.early_until == 0.0 and paper.at_progress(0.0) is paper  # off in the paper's recipe
    with pytest.raises(ValueError, match="early_until is a fraction"):
        dataclasses.replace(full, early_until=1.0)
    with pytest.raises(ValueError, match="early_corrective_rounds must be >= 0"):
        dataclasses.replace(full, early_corrective_rounds=-1)
    with pytest.raises(ValueError, match=r"loss_rounds \(3\) exceeds the early sessions' 2 rounds"):
        dataclasses.replace(full, loss_rounds=3, early_corrective_rounds=1)


def test_first_points_fall_inside_their_masks_even_non_convex_ones():
    masks = ring_masks()
    points = first_point(masks, stride=4, generator=torch.Generator().manual_seed(0))
    cells = (points / 4).floor().long()
    assert masks[torch.arange(64), cells[:, 1], cells[:, 0]].all()


def test_points_are_spread_uniformly_over_the_mask():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2:4, 2:6] = True  # 8 cells
    g = torch.Generator().manual_seed(0)
    cells = torch.cat([(first_point(mask, 1, generator=g) // 1).long() for _ in range(4000)])
    counts = torch.bincount(cells[:, 1] * 8 + cells[:, 0], minlength=64).float()
    inside = counts[mask.flatten()]
    assert counts.sum() == inside.sum() and (inside / 4000 - 1 / 8).abs().max() < 0.03


def test_noisy_boxes_stay_near_the_tight_box_within_the_cap():
    masks = ring_masks()
    cfg = prompt_config("sam")
    tight = mask_boxes(masks, stride=4)
    noisy = noisy_boxes(masks, 4, cfg, image_size=128, generator=torch.Generator().manual_seed(0))
    assert (noisy - tight).abs().max() <= cfg.box_noise_max + 1e-4
    assert (noisy - tight).abs().mean() > 0.5, "there is noise"
    assert (noisy[:, 2:] >= noisy[:, :2]).all() and noisy.min() >= 0 and noisy.max() <= 128


def test_corrective_clicks_come_from_the_error_region_with_the_right_label():
    targets = ring_masks()
    predicted = torch.zeros_like(targets)
    predicted[:, :, :16] = True  # left half predicted: misses the right of each ring, adds spurious left pixels
    points, labels = corrective_clicks(predicted, targets, stride=4, generator=torch.Generator().manual_seed(0))
    cells = (points / 4).floor().long()
    idx = torch.arange(len(targets))
    in_target = targets[idx, cells[:, 1], cells[:, 0]]
    in_pred = predicted[idx, cells[:, 1], cells[:, 0]]
    assert (in_target != in_pred).all(), "every click lands on an error"
    assert torch.equal(labels.bool(), in_target), "false negative -> positive click, false positive -> negative"
    assert labels.sum() > 0 and (labels == 0).sum() > 0


def test_a_perfect_prediction_and_sam2_gt_clicks_give_positive_clicks_inside_the_target():
    targets = ring_masks()
    points, labels = corrective_clicks(targets.clone(), targets, stride=4, generator=torch.Generator().manual_seed(0))
    assert labels.all()
    predicted = torch.zeros_like(targets)
    _, labels = corrective_clicks(predicted, targets, 4, gt_click_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert labels.all()


def test_centre_clicks_land_where_the_evaluation_protocol_clicks():
    targets = ring_masks(16)
    predicted = torch.zeros_like(targets)
    predicted[:, :, :16] = True
    protocol_first, _ = next_click(torch.zeros_like(targets), targets, 4)
    protocol_points, protocol_labels = next_click(predicted, targets, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(first_point(targets, 4, centre_prob=1.0, generator=g), protocol_first)
    points, labels = corrective_clicks(predicted, targets, 4, centre_prob=1.0, generator=g)
    assert torch.equal(points, protocol_points) and torch.equal(labels, protocol_labels)
    # Half the clicks: some at the protocol's cell centres, the others uniform in the error region.
    many = ring_masks(400)
    predicted_many = torch.zeros_like(many)
    predicted_many[:, :, :16] = True
    points, _ = corrective_clicks(predicted_many, many, 4, centre_prob=0.5, generator=g)
    centred = (points == next_click(predicted_many, many, 4)[0]).all(1).float().mean()
    assert 0.4 < centred < 0.6
    # sam2's ground-truth clicks stay what they are.
    _, labels = corrective_clicks(predicted, targets, 4, gt_click_prob=1.0, centre_prob=1.0, generator=g)
    assert labels.all()
