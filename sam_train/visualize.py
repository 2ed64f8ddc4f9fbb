"""Overlay masks and prompts on an image, for demos and for eyeballing auto-labels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    dtype=np.float32,
)


def overlay_masks(
    image: np.ndarray,
    masks: list[np.ndarray] | np.ndarray,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    alpha: float = 0.55,
) -> np.ndarray:
    """Return an H x W x 3 uint8 image with masks tinted, positive clicks green, negative red, boxes drawn."""
    out = image.astype(np.float32).copy()
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        out[mask] = (1 - alpha) * out[mask] + alpha * _PALETTE[i % len(_PALETTE)]
    canvas = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    radius = max(3, min(image.shape[:2]) // 80)
    for (x, y), label in zip(np.asarray(points if points is not None else []).reshape(-1, 2),
                             np.asarray(point_labels if point_labels is not None else []).reshape(-1)):
        color = (0, 255, 0) if label == 1 else (255, 0, 0)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(255, 255, 255), width=2)
    for box in np.asarray(boxes if boxes is not None else []).reshape(-1, 4):
        draw.rectangle(box.tolist(), outline=(255, 255, 255), width=2)
    return np.asarray(canvas)


_HIT, _MISSED, _SPURIOUS = (0, 130, 200), (255, 225, 25), (245, 130, 48)


def draw_session(
    image: np.ndarray,
    target: np.ndarray,
    predicted: np.ndarray,
    clicks: np.ndarray,
    click_labels: np.ndarray,
    alpha: float = 0.55,
) -> np.ndarray:
    """One interactive session, H x W x 3 uint8: hits blue, misses yellow, spurious cells orange, numbered clicks.

    `target` and `predicted` are h x w bool covering the same area as the image at an integer
    fraction of its resolution (e.g. the loss grid); `clicks` K x 2 (x, y) image pixels,
    `click_labels` K (1 positive: green, 0 negative: red).
    """
    scale = image.shape[0] // target.shape[0]
    if target.shape != predicted.shape or (target.shape[0] * scale, target.shape[1] * scale) != image.shape[:2]:
        raise ValueError(f"masks {target.shape} and {predicted.shape} do not tile an image of {image.shape[:2]}")
    target, predicted = (np.asarray(m, dtype=bool).repeat(scale, 0).repeat(scale, 1) for m in (target, predicted))
    out = image.astype(np.float32).copy()
    for region, color in ((target & predicted, _HIT), (target & ~predicted, _MISSED), (predicted & ~target, _SPURIOUS)):
        out[region] = (1 - alpha) * out[region] + alpha * np.array(color, dtype=np.float32)
    canvas = Image.fromarray(overlay_masks(out.astype(np.uint8), [], points=clicks, point_labels=click_labels))
    draw = ImageDraw.Draw(canvas)
    offset = max(3, min(image.shape[:2]) // 80) + 2  # beside the click's dot
    for i, (x, y) in enumerate(np.asarray(clicks).reshape(-1, 2)):
        draw.text((x + offset, y - offset), str(i + 1), fill=(255, 255, 255))
    return np.asarray(canvas)
