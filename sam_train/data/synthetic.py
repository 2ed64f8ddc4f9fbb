"""Procedural scenes with SAM's three-level ambiguity: objects made of parts made of subparts.

Two styles share one `Scene` type:
- "objects" (`draw_scene`, the default, what the built-in `tiny` was trained on): each object is
  a union of 2-3 textured parts, each part carries 0-2 subparts of its own texture; later objects
  occlude earlier ones, and every mask is the *visible* region, as in SA-1B. A click on a
  subpart is therefore genuinely ambiguous between subpart, part and whole object.
- "cells" (`draw_cells`): a microscopy-like domain the built-in model never saw, for the data
  engine demo: smooth, glowing, wobbly cells on a dark noisy background, grouped in colonies
  (whole) of cells (part) with a nucleus each (subpart); no stripes, soft edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

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


def draw_cells(rng: np.random.Generator, height: int, width: int, num_colonies: int | None = None) -> Scene:
    """Draw one microscopy-like scene: colonies (whole) of touching cells (part), each with a nucleus (subpart)."""
    if num_colonies is None:
        num_colonies = int(rng.integers(2, 5))
    background = rng.uniform(10, 40, size=3).astype(np.float32)
    glow = _smooth_noise(rng, height, width, cells=6) * 25  # uneven illumination, as under a microscope
    image = background + (glow + 6 * rng.standard_normal((height, width), dtype=np.float32))[..., None]
    owner = np.full((height, width), -1, dtype=np.int32)
    cells: list[tuple[int, Box, np.ndarray, np.ndarray]] = []  # (colony, box, cell and nucleus masks in it)
    scale = min(height, width)
    for colony in range(num_colonies):
        hue = rng.uniform(60, 255, size=3).astype(np.float32) * rng.choice([0.4, 1.0], size=3)
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        # Cells 16-26% of the short side across: at the tiny model's 256 px a cell spans 2-3 of
        # its 16 px patches and a nucleus stays above its 4 px mask grid (below it, unresolvable).
        radius = rng.uniform(0.08, 0.13) * scale
        for _ in range(int(rng.integers(1, 5))):
            py, px = cy + rng.normal(0, 0.8) * radius, cx + rng.normal(0, 0.8) * radius
            r = radius * rng.uniform(0.7, 1.2)
            box, yy, xx = _window(height, width, py, px, 1.4 * r)
            cell = _wobbly_disc(rng, yy - py, xx - px, r)
            if cell.sum() < 64:
                continue
            distance = np.sqrt((yy - py) ** 2 + (xx - px) ** 2) / r
            shade = np.clip(1.1 - 0.5 * distance, 0.3, 1.0)[..., None]  # brighter centre, soft rim
            texture = hue * shade + 8 * rng.standard_normal((*cell.shape, 1), dtype=np.float32)
            ny, nx = py + rng.normal(0, 0.15) * r, px + rng.normal(0, 0.15) * r
            nucleus = _wobbly_disc(rng, yy - ny, xx - nx, r * rng.uniform(0.3, 0.5)) & cell
            texture[nucleus] = np.clip(hue[::-1] * 0.5 + 120, 0, 255)
            image[box][cell] = texture[cell]
            owner[box][cell] = len(cells)  # later cells lie on top
            cells.append((colony, box, cell, nucleus))
    scene = Scene(image=np.clip(image, 0, 255).astype(np.uint8))
    for colony in range(num_colonies):
        whole = np.zeros((height, width), dtype=bool, order="F")
        members = 0
        for k, (col, box, cell, nucleus) in enumerate(cells):
            if col != colony:
                continue
            on_top = owner[box] == k
            for mask, level in ((cell & on_top, "part"), (nucleus & on_top, "subpart")):
                if mask.sum() >= 16:
                    canvas = np.zeros((height, width), dtype=bool, order="F")
                    canvas[box] = mask
                    scene.masks.append(canvas)
                    scene.levels.append(level)
                    scene.object_ids.append(colony)
            whole[box] |= cell & on_top
            members += 1
        if members > 1 and whole.sum() >= 16:  # a lone cell is its own whole: one mask, not two
            scene.masks.append(whole)
            scene.levels.append("whole")
            scene.object_ids.append(colony)
    return scene


def _window(height: int, width: int, cy: float, cx: float, reach: float) -> tuple[Box, np.ndarray, np.ndarray]:
    """The image box within `reach` of (cy, cx) and its pixel coordinates (float32 grids)."""
    y0, y1 = int(np.clip(cy - reach, 0, height)), int(np.clip(cy + reach + 1, 0, height))
    x0, x1 = int(np.clip(cx - reach, 0, width)), int(np.clip(cx + reach + 1, 0, width))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), yy, xx


def _wobbly_disc(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """A disc (offsets dy, dx from its centre) whose radius wobbles with the angle, like a cell membrane."""
    angle = np.arctan2(dy, dx)
    wobble = sum(rng.uniform(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.sqrt(dy**2 + dx**2) <= radius * (1 + wobble)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR))


SCENE_STYLES = {"objects": draw_scene, "cells": draw_cells}
