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
