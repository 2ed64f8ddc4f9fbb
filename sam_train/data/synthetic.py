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


Box = tuple[slice, slice]


def draw_scene(rng: np.random.Generator, height: int, width: int, num_objects: int | None = None) -> Scene:
    """Draw one scene; the same generator state always gives the same scene."""
    if num_objects is None:
        num_objects = int(rng.integers(3, 9))
    noise = rng.random((height, width), dtype=np.float32) - 0.5  # one noise field, sliced by every region
    full: Box = (slice(0, height), slice(0, width))
    image = np.empty((height, width, 3), dtype=np.uint8)
    _paint(rng, image, noise, full, np.ones((height, width), dtype=bool))
    owner = np.full((height, width), -1, dtype=np.int32)  # object visible at each pixel
    regions: list[tuple[str, int, Box, np.ndarray]] = []  # (level, object id, box, mask inside box)
    for obj in range(num_objects):
        whole = np.zeros((height, width), dtype=bool)
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        size = rng.uniform(0.08, 0.25) * min(height, width)
        for _ in range(int(rng.integers(2, 4))):
            py, px = cy + rng.normal(0, 0.6) * size, cx + rng.normal(0, 0.6) * size
            box, part = _shape(rng, height, width, py, px, size * rng.uniform(0.5, 0.9), size * rng.uniform(0.5, 0.9))
            part &= ~whole[box]  # the parts of one object tile it without overlapping
            if part.sum() < 64:
                continue
            whole[box] |= part
            _paint(rng, image, noise, box, part)
            regions.append(("part", obj, box, part))
            ys, xs = np.nonzero(part)
            for _ in range(int(rng.integers(0, 3))):
                k = int(rng.integers(len(ys)))
                sub_box, sub = _shape(
                    rng, height, width, box[0].start + ys[k], box[1].start + xs[k],
                    size * rng.uniform(0.12, 0.3), size * rng.uniform(0.12, 0.3),
                )
                sub &= _crop(part, box, sub_box)
                if sub.sum() < 32:
                    continue
                _paint(rng, image, noise, sub_box, sub)
                regions.append(("subpart", obj, sub_box, sub))
        if whole.any():
            regions.append(("whole", obj, full, whole))
            owner[whole] = obj  # occludes everything drawn before

    scene = Scene(image=image)
    for level, obj, box, mask in regions:
        visible = mask & (owner[box] == obj)
        if visible.sum() >= 16:
            canvas = np.zeros((height, width), dtype=bool, order="F")  # RLE's order: encodes without a copy
            canvas[box] = visible
            scene.masks.append(canvas)
            scene.levels.append(level)
            scene.object_ids.append(obj)
    return scene


def _shape(
    rng: np.random.Generator, height: int, width: int, cy: float, cx: float, ry: float, rx: float
) -> tuple[Box, np.ndarray]:
    """A random ellipse, rounded square or near-rectangle at (cy, cx): its clipped box and the mask inside it."""
    r = max(ry, rx)
    y0, y1 = int(np.clip(cy - r, 0, height)), int(np.clip(cy + r + 1, 0, height))
    x0, x1 = int(np.clip(cx - r, 0, width)), int(np.clip(cx + r + 1, 0, width))
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    angle = rng.uniform(0, np.pi)
    u = (xs * np.cos(angle) + ys * np.sin(angle)) / rx
    v = (ys * np.cos(angle) - xs * np.sin(angle)) / ry
    exponent = rng.choice([2.0, 4.0, 16.0])
    return (slice(y0, y1), slice(x0, x1)), np.abs(u) ** exponent + np.abs(v) ** exponent <= 1.0


def _crop(mask: np.ndarray, box: Box, inner: Box) -> np.ndarray:
    """The part of `mask` (defined over `box`) that lies inside `inner`, as an array over `inner`."""
    out = np.zeros((inner[0].stop - inner[0].start, inner[1].stop - inner[1].start), dtype=bool)
    y0, y1 = max(box[0].start, inner[0].start), min(box[0].stop, inner[0].stop)
    x0, x1 = max(box[1].start, inner[1].start), min(box[1].stop, inner[1].stop)
    if y0 < y1 and x0 < x1:
        out[y0 - inner[0].start : y1 - inner[0].start, x0 - inner[1].start : x1 - inner[1].start] = mask[
            y0 - box[0].start : y1 - box[0].start, x0 - box[1].start : x1 - box[1].start
        ]
    return out


def _paint(rng: np.random.Generator, image: np.ndarray, noise: np.ndarray, box: Box, mask: np.ndarray) -> None:
    """Fill `mask` (over `box`) with a random colour, oriented stripes and noise.

    Stripes and noise make regions differ in texture, not only in colour. The stripes are
    sin(a*x + b*y), expanded as a sum of outer products so no per-pixel sine is computed.
    """
    color = rng.uniform(0, 255, size=3).astype(np.float32)
    amplitude = np.float32(rng.uniform(5, 40))
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 40)
    fx, fy = 2 * np.pi * np.cos(angle) / period, 2 * np.pi * np.sin(angle) / period
    xs = np.arange(box[1].start, box[1].stop, dtype=np.float32) * np.float32(fx)
    ys = np.arange(box[0].start, box[0].stop, dtype=np.float32) * np.float32(fy)
    stripes = np.sin(ys)[:, None] * np.cos(xs)[None, :] + np.cos(ys)[:, None] * np.sin(xs)[None, :]
    shade = amplitude * (stripes + noise[box])
    texture = np.clip(color + shade[mask][:, None], 0, 255).astype(np.uint8)
    image[box][mask] = texture
