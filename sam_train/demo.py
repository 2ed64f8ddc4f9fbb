"""A one-minute look at the whole path: build a model, embed a synthetic image once, prompt it twice.

Shows the SAM usage pattern (heavy encoder once, light decoder per prompt) with timings, and
writes an overlay PNG. With `checkpoint` it shows what trained weights do on the same scene.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from sam_train.atomic_io import atomic_path
from sam_train.data.synthetic import draw_scene
from sam_train.model import build_sam
from sam_train.predictor import SamPredictor
from sam_train.visualize import overlay_masks


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def interior_point(mask: np.ndarray) -> np.ndarray:
    """The (x, y) pixel of `mask` nearest its centroid (the centroid itself may fall outside)."""
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean(), ys.mean()])
    k = np.argmin((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2)
    return np.array([xs[k], ys[k]], dtype=np.float64)


def run_demo(cfg: DictConfig) -> dict:
    """Run the demo of `configs/demo.yaml`, write `<out>/demo.png`, and return the numbers it prints."""
    torch.manual_seed(cfg.seed)
    scene = draw_scene(np.random.default_rng(cfg.seed), height=cfg.scene.height, width=cfg.scene.width)
    model = build_sam(cfg.model.name, checkpoint=cfg.model.checkpoint, pretrained=cfg.model.pretrained)
    predictor = SamPredictor(model)

    start = time.perf_counter()
    predictor.set_image(scene.image)
    encode_ms = 1000 * (time.perf_counter() - start)

    wholes = [m for m, level in zip(scene.masks, scene.levels) if level == "whole"]
    target = max(wholes, key=lambda m: m.sum())
    point = interior_point(target)[None]
    ys, xs = np.nonzero(target)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)

    start = time.perf_counter()
    masks, iou_pred, _ = predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
    decode_ms = 1000 * (time.perf_counter() - start)
    point_mask = masks[int(np.argmax(iou_pred))]
    box_mask = predictor.predict(box=box, multimask_output=False)[0][0]

    panels = [
        overlay_masks(scene.image, [target], alpha=0.45),
        overlay_masks(scene.image, [point_mask], points=point, point_labels=np.array([1])),
        overlay_masks(scene.image, [box_mask], boxes=box[None]),
    ]
    png = Path(cfg.out) / "demo.png"
    with atomic_path(png) as tmp:
        Image.fromarray(np.concatenate(panels, axis=1)).save(tmp, format="PNG")
    return {
        "model": cfg.model.name,
        "weights": cfg.model.checkpoint or ("built-in" if cfg.model.pretrained else "random (untrained)"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "encode_ms": encode_ms,
        "decode_ms": decode_ms,
        "point_iou": mask_iou(point_mask, target),
        "box_iou": mask_iou(box_mask, target),
        "overlay": str(png),
    }
