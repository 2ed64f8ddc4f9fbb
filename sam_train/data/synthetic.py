"""Procedural scenes with SAM's three-level ambiguity: objects made of parts made of subparts.

Each object is a union of 2-3 textured parts, each part carries 0-2 subparts of its own texture;
later objects occlude earlier ones, and every mask is the *visible* region, as in SA-1B. A click
on a subpart is therefore genuinely ambiguous between subpart, part and whole object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LEVELS = ("whole", "part", "subpart")


@dataclass
class Scene:
    """An RGB image and its visible instance masks, each tagged with its level and object."""

    image: np.ndarray  # H x W x 3 uint8
    masks: list[np.ndarray] = field(default_factory=list)  # each H x W bool
    levels: list[str] = field(default_factory=list)  # "whole" | "part" | "subpart"
    object_ids: list[int] = field(default_factory=list)


def draw_scene(rng: np.random.Generator, height: int, width: int, num_objects: int | None = None) -> Scene:
    """Draw one scene; the same generator state always gives the same scene."""
    if num_objects is None:
        num_objects = int(rng.integers(3, 9))
    image = _texture(rng, (0, height, 0, width), rng.uniform(40, 215, size=3), rng.uniform(10, 30))
    owner = np.full((height, width), -1, dtype=np.int32)  # index of the region visible at each pixel
    regions: list[tuple[str, int, np.ndarray]] = []  # (level, object id, drawn mask)
    for obj in range(num_objects):
        whole = np.zeros((height, width), dtype=bool)
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        size = rng.uniform(0.08, 0.25) * min(height, width)
        for _ in range(int(rng.integers(2, 4))):
            py, px = cy + rng.normal(0, 0.6) * size, cx + rng.normal(0, 0.6) * size
            part = _shape(rng, height, width, py, px, size * rng.uniform(0.5, 0.9), size * rng.uniform(0.5, 0.9))
            part &= ~whole  # parts of one object tile it without overlapping
            if part.sum() < 64:
                continue
            whole |= part
            _paint(rng, image, part)
            regions.append(("part", obj, part))
            ys, xs = np.nonzero(part)
            for _ in range(int(rng.integers(0, 3))):
                k = int(rng.integers(len(ys)))
                sub = _shape(rng, height, width, ys[k], xs[k], size * rng.uniform(0.12, 0.3), size * rng.uniform(0.12, 0.3))
                sub &= part
                if sub.sum() < 32:
                    continue
                _paint(rng, image, sub)
                regions.append(("subpart", obj, sub))
        if whole.any():
            regions.append(("whole", obj, whole))
            owner[whole] = obj  # occludes everything drawn before

    scene = Scene(image=image)
    for level, obj, mask in regions:
        visible = mask & (owner == obj)
        if visible.sum() >= 16:
            scene.masks.append(visible)
            scene.levels.append(level)
            scene.object_ids.append(obj)
    return scene


def _shape(rng: np.random.Generator, height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """A random ellipse, rotated rectangle or superellipse centred at (cy, cx), as an H x W mask."""
    mask = np.zeros((height, width), dtype=bool)
    r = max(ry, rx)
    y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, height))
    x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, width))
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / rx
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ry
    exponent = rng.choice([2.0, 4.0, 16.0])  # ellipse, rounded square, near-rectangle
    mask[y0:y1, x0:x1] = np.abs(u) ** exponent + np.abs(v) ** exponent <= 1.0
    return mask


def _texture(rng: np.random.Generator, box: tuple[int, int, int, int], color: np.ndarray, amplitude: float) -> np.ndarray:
    """Base colour plus oriented stripes and noise over box = (y0, y1, x0, x1), as uint8 RGB.

    Stripes and noise make regions differ in texture, not only in colour.
    """
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 40)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))
    noise = rng.normal(0, amplitude / 3, size=yy.shape).astype(np.float32)
    shade = (amplitude * stripes + noise)[..., None]
    return np.clip(color[None, None, :] + shade, 0, 255).astype(np.uint8)


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Fill `mask` with a fresh random texture, computed only over the mask's bounding box."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    texture = _texture(rng, box, rng.uniform(0, 255, size=3), rng.uniform(5, 40))
    local = mask[box[0] : box[1], box[2] : box[3]]
    image[box[0] : box[1], box[2] : box[3]][local] = texture[local]
