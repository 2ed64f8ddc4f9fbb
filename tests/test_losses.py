"""SAM's losses: focal and dice match their definitions, only the best output is trained, global normalisation."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as reference_focal

from sam_train.losses import LossWeights, actual_iou, dice_loss, sam_loss, sigmoid_focal_loss

PAPER = LossWeights(focal=20.0, dice=1.0, iou=1.0, focal_alpha=0.25, focal_gamma=2.0, iou_loss="mse")


def random_case(n: int = 4, k: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, size, size, generator=g) * 3
    iou_pred = torch.rand(n, k, generator=g)
    targets = torch.rand(n, size, size, generator=g) > 0.6
    return logits, iou_pred, targets


def test_focal_matches_torchvision_reference():
    logits, _, targets = random_case()
    t = targets[:, None].float().expand_as(logits)
    ours = sigmoid_focal_loss(logits, targets[:, None].float(), alpha=0.25, gamma=2.0)
    theirs = reference_focal(logits, t, alpha=0.25, gamma=2.0, reduction="none").flatten(2).mean(-1)
    torch.testing.assert_close(ours, theirs)


def test_dice_is_zero_for_a_perfect_mask_and_near_one_for_its_inverse():
    _, _, targets = random_case(k=1)
    t = targets[:, None].float()
    perfect = (t * 2 - 1) * 50
    assert dice_loss(perfect, t).max() < 1e-3
    assert dice_loss(-perfect, t).min() > 0.95


def test_actual_iou_of_thresholded_prediction():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1  # 8 pixels
    pred = torch.full((1, 1, 4, 4), -5.0)
    pred[..., :1, :] = 5  # 4 pixels, all inside
    assert actual_iou(pred, target).item() == pytest.approx(0.5)
    assert actual_iou(torch.full((1, 1, 4, 4), -1.0), torch.zeros(1, 1, 4, 4)).item() == 1.0


def test_only_the_best_of_three_outputs_gets_mask_gradient():
    logits, iou_pred, targets = random_case(n=3)
    logits[:, 1] = (targets.float() * 2 - 1) * 8  # output 1 nearly right for every prompt
    logits.requires_grad_(True)
    weights = LossWeights(**{**PAPER.__dict__, "iou": 0.0})
    sam_loss(logits, iou_pred, targets, weights, num_masks=3)["total"].backward()
    grad = logits.grad.flatten(2).abs().sum(-1)  # N x K
    assert (grad[:, 1] > 0).all() and (grad[:, [0, 2]] == 0).all()


def test_iou_head_regresses_the_real_iou_of_every_output():
    logits, iou_pred, targets = random_case(n=2)
    iou_pred.requires_grad_(True)
    weights = LossWeights(**{**PAPER.__dict__, "focal": 0.0, "dice": 0.0})
    parts = sam_loss(logits, iou_pred, targets, weights, num_masks=2)
    expected = ((iou_pred - actual_iou(logits, targets[:, None].float())) ** 2).mean(1).sum() / 2
    torch.testing.assert_close(parts["total"], expected)
    parts["total"].backward()
    assert (iou_pred.grad != 0).all()


def test_splitting_the_batch_over_ranks_with_the_global_mask_count_gives_the_same_loss():
    logits, iou_pred, targets = random_case(n=6)
    whole = sam_loss(logits, iou_pred, targets, PAPER, num_masks=6)["total"]
    halves = sum(sam_loss(logits[s], iou_pred[s], targets[s], PAPER, num_masks=6)["total"] for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(whole, halves)


def test_low_res_logits_are_upsampled_to_the_targets():
    logits, iou_pred, targets = random_case(size=32)
    small = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    parts = sam_loss(small, iou_pred, targets, PAPER, num_masks=4)
    assert torch.isfinite(parts["total"]) and parts["total"] > 0


def test_l1_option_and_bad_option():
    logits, iou_pred, targets = random_case()
    l1 = LossWeights(**{**PAPER.__dict__, "iou_loss": "l1"})
    assert torch.isfinite(sam_loss(logits, iou_pred, targets, l1, num_masks=4)["iou"])
    with pytest.raises(ValueError, match="iou_loss must be"):
        sam_loss(logits, iou_pred, targets, LossWeights(**{**PAPER.__dict__, "iou_loss": "huber"}), num_masks=4)
