"""Simulated interactive prompts for training: first points and boxes, corrective clicks, the round schedule."""

from sam_train.prompts.simulate import (
    PromptConfig,
    corrective_clicks,
    first_point,
    loss_round_flags,
    mask_boxes,
    noisy_boxes,
    round_schedule,
)

__all__ = [
    "PromptConfig",
    "corrective_clicks",
    "first_point",
    "loss_round_flags",
    "mask_boxes",
    "noisy_boxes",
    "round_schedule",
]
