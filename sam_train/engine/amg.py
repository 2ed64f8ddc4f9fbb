"""Automatic mask generation: SAM's recipe for segmenting everything in an image.

A grid of single-point prompts covers the image (and, with `crop_n_layers`, overlapping zoomed-in
crops of it); every point yields 3 masks; masks the model itself doubts (predicted IoU), masks that
change when the logit threshold moves (stability), masks cut by a crop's inner border and masks
covering (nearly) the whole image are dropped; duplicates go by box NMS, within a crop and across
crops (smaller crops win); small islands and holes are cleaned. The masks are those of Meta's
`SamAutomaticMaskGenerator` (tests/engine check them against it), except that the SA-1B rule
dropping near-whole-image masks, absent from Meta's code, is on by default (`max_mask_coverage`).
The work is arranged so that the decoder side costs a fraction of Meta's:

- each crop is encoded once, and what every prompt shares is computed once
  (`MaskDecoder.prepare_one_image`); prompts are decoded a few at a time against it with the
  image never copied per prompt and low-rank cross-attention (`MaskDecoder.attend_one_image`);
- the IoU head reads the transformer's output tokens, so prompts whose 3 masks all fail
  `pred_iou_thresh` are never upscaled, and only the low-res cells that cover the image (not the
  padding) are;
- only masks that pass the IoU filter reach full resolution, one chunk at a time;
- masks are run-length encoded in C (pycocotools); boxes, areas and stability come from
  whole-chunk tensor reductions.

Settings live in `configs/autolabel.yaml` (`amg`), read into `AmgSettings`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from torchvision.ops import nms

from sam_train.data import rle
from sam_train.data.convert import IMAGE_SUFFIXES
from sam_train.data.sa1b import make_record
from sam_train.data.shards import finish_dataset, skipped_items, write_share
from sam_train.engine.records import ANN_ID_STRIDE, Provenance, now_iso
from sam_train.geometry import scale_coords
from sam_train.model import Sam
from sam_train.model.checkpoint import weights_digest
from sam_train.model.mask_decoder import PROMPTS_PER_PASS, MaskDecoder
from sam_train.model.transformer import SharedImage
from sam_train.predictor import SamPredictor

FULL_RES_CHUNK = 32  # masks upsampled to full resolution at once: bounds memory on large images
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # as OpenCV's connectedComponents(..., 8) in Meta's cleaning


@dataclass(frozen=True)
class AmgSettings:
    """Automatic mask generation settings; `configs/autolabel.yaml` (`amg`) documents each."""

    points_per_side: int
    points_per_batch: int
    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float
    box_nms_thresh: float
    crop_n_layers: int
    crop_nms_thresh: float
    crop_overlap_ratio: float
    crop_n_points_downscale_factor: int
    crop_edge_margin: float
    max_mask_coverage: float | None
    min_mask_region_area: int

    def __post_init__(self) -> None:
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"amg.{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_n_layers < 0 or self.min_mask_region_area < 0:
            raise ValueError("amg.crop_n_layers and amg.min_mask_region_area must be >= 0")
        if self.points_per_side // self.crop_n_points_downscale_factor**self.crop_n_layers < 1:
            raise ValueError(
                f"amg: {self.points_per_side} points per side downscaled by {self.crop_n_points_downscale_factor}"
                f" per layer leaves no point in crop layer {self.crop_n_layers}"
            )

    @classmethod
    def from_config(cls, node: DictConfig | Mapping) -> "AmgSettings":
        """Settings from a config node (e.g. `cfg.amg`); unknown or missing keys are an error, not a silent default."""
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(values) - names), sorted(names - set(values))
        if unknown or missing:
            raise ValueError(f"amg settings: unknown {unknown or 'none'}, missing {missing or 'none'}")
        return cls(**values)

    def as_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Geometry: point grids and crops


def point_grid(n_per_side: int) -> np.ndarray:
    """n^2 x 2 (x, y) cell centres of an n x n grid over [0, 1]^2, x fastest (Meta's order)."""
    centres = (np.arange(n_per_side) + 0.5) / n_per_side
    xs, ys = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> list[tuple[list[int], int]]:
    """([x0, y0, x1, y1], layer) of the whole image, then 2^i x 2^i overlapping crops for layers i = 1..n_layers.

    Crops of layer i overlap by `overlap_ratio` x the short side x 2 / 2^i; listed x-major, as Meta does
    (the order decides NMS ties).
    """
    boxes = [([0, 0, width, height], 0)]
    short_side = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + height) / per_side)
        for x0 in (int((crop_w - overlap) * i) for i in range(per_side)):
            for y0 in (int((crop_h - overlap) * i) for i in range(per_side)):
                boxes.append(([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)], layer))
    return boxes


# ---------------------------------------------------------------------------------------------
# Mask measures


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks at threshold +- offset (the higher one lies inside the lower): ... x H x W -> ...

    A mask whose extent barely moves when the cut-off does is a confident one. NaN where even the
    lower cut-off leaves the mask empty.
    """
    inner = _count(logits > threshold + offset)
    outer = _count(logits > threshold - offset)
    return inner.float() / outer.float()


def _count(masks: torch.Tensor) -> torch.Tensor:
    """True pixels of ... x H x W bool masks, as int32."""
    return _row_counts(masks).sum(-1, dtype=torch.int32)


def _row_counts(masks: torch.Tensor) -> torch.Tensor:
    # Summing bools along rows into int16 is ~10x faster on CPU than a plain sum (which widens to int64).
    return masks.sum(-1, dtype=torch.int16 if masks.shape[-1] < 2**15 else torch.int32)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes of N x H x W bool masks as N x 4 [x0, y0, x1, y1] with x1, y1 the last pixel (inclusive,
    Meta's convention, which its NMS thresholds were tuned with); [0, 0, 0, 0] for an empty mask."""
    return _area_and_boxes(masks)[1]


def _area_and_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N areas, N x 4 `mask_boxes`) of N x H x W bool masks, sharing one pass over the rows."""
    rows = _row_counts(masks)  # N x H
    present = {"y": rows > 0, "x": masks.any(1)}  # N x H, N x W
    lo, hi = [], []
    for axis in ("x", "y"):
        index = torch.arange(present[axis].shape[1], device=masks.device)
        lo.append(torch.where(present[axis], index, present[axis].shape[1]).amin(1))
        hi.append(torch.where(present[axis], index, -1).amax(1))
    boxes = torch.stack([lo[0], lo[1], hi[0], hi[1]], dim=1)
    boxes = torch.where((boxes[:, 2:] >= boxes[:, :2]).all(1, keepdim=True), boxes, 0)
    return rows.sum(-1, dtype=torch.int32), boxes


def near_crop_edge(boxes: torch.Tensor, crop_box: Sequence[int], image_box: Sequence[int], margin: float) -> torch.Tensor:
    """N bools: the image-frame box comes within `margin` px of a crop border that is not an image border.

    Such a mask was most likely cut by the crop; the crop that holds it whole will find it.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.as_tensor(image_box, dtype=torch.float, device=boxes.device)
    near_crop = torch.isclose(boxes.float(), crop, atol=margin, rtol=0)
    near_image = torch.isclose(boxes.float(), image, atol=margin, rtol=0)
    return (near_crop & ~near_image).any(1)


def remove_small_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """Fill holes, then drop islands, smaller than `min_area` px (8-connected): (mask, changed).

    A mask made only of small islands keeps its largest. As in SAM, a "hole" is any background
    component under the size, including one that touches the image border.
    """
    filled, holes = _fill_small_holes(mask, min_area)
    cleaned, islands = _drop_small_islands(filled, min_area)
    return cleaned, holes or islands


def _fill_small_holes(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    height, width = mask.shape
    box = _bool_box(mask)
    if box is None:
        return mask, False
    y0, y1, x0, x1 = box
    outside = height * width - (y1 - y0) * (x1 - x0)
    spans = (x0 == 0 and x1 == width) or (y0 == 0 and y1 == height)
    if spans or outside < min_area:
        window = (slice(0, height), slice(0, width))
    else:
        # The background outside the box is one connected region of >= min_area pixels, so a
        # component reaching it is no hole: label only the box plus a 1-pixel ring around it.
        window = (slice(max(y0 - 1, 0), min(y1 + 1, height)), slice(max(x0 - 1, 0), min(x1 + 1, width)))
    labels, count = ndimage.label(~mask[window], structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = sizes < min_area
    small[0] = False  # label 0 is the mask itself
    if window[0].stop - window[0].start < height or window[1].stop - window[1].start < width:
        ring = np.ones(labels.shape, dtype=bool)
        ring[y0 - window[0].start : y1 - window[0].start, x0 - window[1].start : x1 - window[1].start] = False
        small[np.unique(labels[ring])] = False
    if not small.any():
        return mask, False
    filled = mask.copy()
    filled[window] |= small[labels]
    return filled, True


def _drop_small_islands(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    box = _bool_box(mask)
    if box is None:
        return mask, False
    y0, y1, x0, x1 = box
    window = (slice(y0, y1), slice(x0, x1))  # every island lies inside the mask's box
    labels, count = ndimage.label(mask[window], structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    if (sizes >= min_area).all():
        return mask, False
    keep = sizes >= min_area
    if not keep.any():
        keep[np.argmax(sizes)] = True
    kept = mask.copy()
    kept[window] = np.concatenate([[False], keep])[labels]
    return kept, True


def _bool_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), ends exclusive, of a bool mask; None if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class MaskCandidates:
    """Masks found so far, in the image frame: RLEs plus what filtering and NMS need."""

    rles: list[dict]  # COCO compressed RLE of the full image (bytes counts, pycocotools' own form)
    boxes: torch.Tensor  # N x 4 XYXY, inclusive ends (see `mask_boxes`)
    predicted_iou: torch.Tensor  # N
    stability: torch.Tensor  # N
    points: np.ndarray  # N x 2 (x, y) prompt of each mask
    crop_boxes: torch.Tensor  # N x 4 XYXY crop each mask was found in

    @classmethod
    def empty(cls) -> "MaskCandidates":
        return cls([], torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), np.zeros((0, 2)), torch.zeros(0, 4))

    @classmethod
    def cat(cls, parts: Sequence["MaskCandidates"]) -> "MaskCandidates":
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(
            [r for p in parts for r in p.rles],
            torch.cat([p.boxes.float() for p in parts]),
            torch.cat([p.predicted_iou for p in parts]),
            torch.cat([p.stability for p in parts]),
            np.concatenate([p.points for p in parts]),
            torch.cat([p.crop_boxes.float() for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, keep: torch.Tensor) -> "MaskCandidates":
        """The candidates at indices (or bool mask) `keep`, in that order."""
        index = torch.as_tensor(keep).cpu()
        index = index.nonzero().flatten() if index.dtype == torch.bool else index.long()
        return MaskCandidates(
            [self.rles[i] for i in index.tolist()],
            self.boxes[index],
            self.predicted_iou[index],
            self.stability[index],
            self.points[index.numpy()],
            self.crop_boxes[index],
        )


@torch.inference_mode()
def generate_masks(model: Sam, image: np.ndarray, settings: AmgSettings, first_id: int = 0) -> list[dict]:
    """SA-1B annotations (ids from `first_id`) of every mask SAM finds in an H x W x 3 uint8 RGB image."""
    return annotations_of(find_masks(model, image, settings), first_id)


@torch.inference_mode()
def find_masks(model: Sam, image: np.ndarray, settings: AmgSettings) -> MaskCandidates:
    """The masks of an image, filtered, deduplicated and cleaned, before they become annotations."""
    _check_image(image)
    height, width = image.shape[:2]
    crops = crop_boxes(height, width, settings.crop_n_layers, settings.crop_overlap_ratio)
    predictor = SamPredictor(model)
    found = MaskCandidates.cat([_crop_masks(predictor, image, box, layer, settings) for box, layer in crops])
    if len(crops) > 1:
        found = dedupe_across_crops(found, settings.crop_nms_thresh)
    if settings.min_mask_region_area > 0:
        renms = max(settings.box_nms_thresh, settings.crop_nms_thresh)
        found = clean_small_regions(found, settings.min_mask_region_area, renms)
    return found


def dedupe_across_crops(found: MaskCandidates, nms_thresh: float) -> MaskCandidates:
    """Box NMS over masks of all crops, preferring masks from smaller crops (they saw the object larger)."""
    if not len(found):
        return found
    boxes = found.crop_boxes
    crop_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return found.select(nms(found.boxes, 1 / crop_area, nms_thresh))


def clean_small_regions(found: MaskCandidates, min_area: int, nms_thresh: float) -> MaskCandidates:
    """Fill small holes and drop small islands (`remove_small_regions`), then box NMS again, preferring
    masks that needed no cleaning (cleaning can turn two masks into duplicates)."""
    if not len(found):
        return found
    cleaned, unchanged = [], []
    for encoded in found.rles:
        mask, changed = remove_small_regions(mask_utils.decode(encoded).view(bool), min_area)
        cleaned.append(mask if changed else None)
        unchanged.append(not changed)
    boxes = found.boxes.clone()
    changed_index = [k for k, m in enumerate(cleaned) if m is not None]
    if changed_index:
        boxes[changed_index] = mask_boxes(torch.from_numpy(np.stack([cleaned[k] for k in changed_index]))).float()
    keep = nms(boxes, torch.tensor(unchanged, dtype=torch.float), nms_thresh)
    for k in keep.tolist():
        if cleaned[k] is not None:
            found.rles[k] = mask_utils.encode(np.asfortranarray(cleaned[k]).view(np.uint8))
            found.boxes[k] = boxes[k]
    return found.select(keep)


def annotations_of(found: MaskCandidates, first_id: int = 0) -> list[dict]:
    """SA-1B annotations of found masks: `sa1b.make_annotation`'s fields, taken from the RLEs (no mask is decoded)."""
    if not len(found):
        return []
    boxes = mask_utils.toBbox(found.rles)  # COCO x, y, w, h
    annotations = []
    for k, encoded in enumerate(found.rles):
        x0, y0, x1, y1 = (float(v) for v in found.crop_boxes[k])
        annotations.append(
            {
                "id": first_id + k,
                "segmentation": {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")},
                "bbox": [float(v) for v in boxes[k]],
                "area": int(mask_utils.area(encoded)),  # one at a time: pycocotools' batched area overflows past 255 masks
                "predicted_iou": float(found.predicted_iou[k]),
                "stability_score": float(found.stability[k]),
                "point_coords": [[float(v) for v in found.points[k]]],
                "crop_box": [x0, y0, x1 - x0, y1 - y0],
            }
        )
    return annotations


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"automatic mask generation needs an H x W x 3 uint8 RGB image, got {desc}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"automatic mask generation needs a non-empty image, got shape {image.shape}")


@dataclass(frozen=True)
class CropFrame:
    """Where a crop lies in its image and what size the model saw it at."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels
    image_size: tuple[int, int]  # (H, W) of the whole image
    input_size: tuple[int, int]  # (h, w) of the crop resized to the model's longest side, before padding

    @property
    def size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0


def _crop_masks(
    predictor: SamPredictor, image: np.ndarray, crop_box: list[int], layer: int, settings: AmgSettings
) -> MaskCandidates:
    """Candidates of one crop: encode it once, decode its point grid in batches, NMS within the crop."""
    model = predictor.model
    prompt_encoder, decoder = model.prompt_encoder, model.mask_decoder
    x0, y0, x1, y1 = crop_box
    crop = image[y0:y1, x0:x1]
    predictor.set_image(crop)
    frame = CropFrame(tuple(crop_box), image.shape[:2], predictor.input_size)
    # Low-res rows/cols that the upsampling to the (unpadded) input size reads, plus the neighbour
    # its bilinear kernel takes, so that cropping the 4h x 4w grid changes no value.
    extent = tuple(
        min(full, math.floor((size - 0.5) / 4 - 0.5) + 2)
        for full, size in zip(prompt_encoder.mask_input_size, frame.input_size)
    )
    grid = point_grid(settings.points_per_side // settings.crop_n_points_downscale_factor**layer)
    points = grid * np.array(frame.size[::-1])  # crop pixels (x, y)
    model_points = scale_coords(points, frame.size, model.image_size)
    model_points = torch.as_tensor(model_points, dtype=torch.float, device=model.device)
    shared = decoder.prepare_one_image(predictor.features, prompt_encoder.get_dense_pe(), prompt_encoder.no_mask_dense(1))
    parts = []
    for start in range(0, len(points), settings.points_per_batch):
        batch = slice(start, start + settings.points_per_batch)
        labels = torch.ones(len(model_points[batch]), 1, dtype=torch.int, device=model.device)
        sparse, _ = prompt_encoder(points=(model_points[batch, None], labels), boxes=None, masks=None)
        decoded = _decode_prompts(decoder, shared, sparse, settings.pred_iou_thresh, extent)
        if decoded is not None:
            logits, iou, prompts = decoded
            batch_points = points[batch][prompts.numpy()] + np.array([x0, y0])  # image frame
            mask_points = np.repeat(batch_points, logits.shape[1], axis=0)
            parts.append(filter_masks(logits.flatten(0, 1), iou.flatten(), mask_points, frame, settings))
    predictor.reset_image()
    found = MaskCandidates.cat(parts)
    return found.select(nms(found.boxes, found.predicted_iou, settings.box_nms_thresh)) if len(found) else found


def _decode_prompts(
    decoder: MaskDecoder, shared: SharedImage, sparse: torch.Tensor, pred_iou_thresh: float, mask_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Decode N prompts on a prepared image, PROMPTS_PER_PASS at a time: (P x 3 x h' x w' low-res
    logits, P x 3 IoU, the P prompt indices) of those with a mask above `pred_iou_thresh`; None if none."""
    logits, iou, prompts = [], [], []
    for first in range(0, sparse.shape[0], PROMPTS_PER_PASS):
        tokens, image_tokens = decoder.attend_one_image(shared, sparse[first : first + PROMPTS_PER_PASS])
        chunk_iou = decoder.iou_from_tokens(tokens, multimask_output=True)
        index = torch.arange(first, first + len(tokens))
        if pred_iou_thresh > 0:
            # The IoU head needs no mask: a prompt whose 3 masks all fail costs no upscaling.
            hopeful = (chunk_iou > pred_iou_thresh).any(1)
            tokens, image_tokens, chunk_iou = tokens[hopeful], image_tokens[hopeful], chunk_iou[hopeful]
            index = index[hopeful.cpu()]
        if len(index):
            logits.append(decoder.masks_from_tokens(tokens, image_tokens, multimask_output=True, mask_size=mask_size))
            iou.append(chunk_iou)
            prompts.append(index)
    return (torch.cat(logits), torch.cat(iou), torch.cat(prompts)) if logits else None


def filter_masks(
    logits: torch.Tensor, iou: torch.Tensor, points: np.ndarray, frame: CropFrame, settings: AmgSettings
) -> MaskCandidates:
    """Apply SAM's per-mask filters to M masks of one crop and RLE-encode the survivors in the image frame.

    `logits` is M x h' x w', the top-left corner of the low-res grid (`MaskDecoder.masks_from_tokens`);
    `iou` the M predicted IoUs; `points` the M x 2 image-frame prompts. Drops, in this order:
    predicted IoU <= pred_iou_thresh (before upsampling), stability < stability_score_thresh,
    empty masks, masks covering >= max_mask_coverage of the image, and masks near an inner crop border.
    """
    if settings.pred_iou_thresh > 0:
        keep = iou > settings.pred_iou_thresh  # on the low-res output: only survivors are upsampled
        logits, iou, points = logits[keep], iou[keep], points[keep.cpu().numpy()]
    height, width = frame.image_size
    x0, y0, x1, y1 = frame.box
    offset = torch.tensor([x0, y0, x0, y0], device=logits.device)
    threshold = 0.0  # Sam.mask_threshold: logits above it are the mask
    parts = []
    for start in range(0, logits.shape[0], FULL_RES_CHUNK):
        chunk = slice(start, start + FULL_RES_CHUNK)
        full = _upsample(logits[chunk], frame.input_size, frame.size)  # m x crop h x crop w
        stability = stability_score(full, threshold, settings.stability_score_offset)
        masks = full > threshold
        del full
        area, boxes = _area_and_boxes(masks)
        boxes = boxes + offset  # image frame
        keep = area > 0  # an empty mask is no annotation
        if settings.stability_score_thresh > 0:
            keep &= stability >= settings.stability_score_thresh
        if settings.max_mask_coverage is not None:
            keep &= area < settings.max_mask_coverage * height * width
        keep &= ~near_crop_edge(boxes, frame.box, [0, 0, width, height], settings.crop_edge_margin)
        if not keep.any():
            continue
        kept = masks[keep].cpu()
        # pycocotools encodes column-major masks: lay each out as W x H and paste it into the image.
        canvas = np.zeros((kept.shape[0], width, height), dtype=np.uint8)
        canvas[:, x0:x1, y0:y1] = kept.transpose(1, 2).numpy()
        keep = keep.cpu()
        parts.append(
            MaskCandidates(
                mask_utils.encode(canvas.transpose(2, 1, 0)),
                boxes.cpu()[keep].float(),
                iou[chunk].cpu()[keep],
                stability.cpu()[keep],
                points[chunk][keep.numpy()],
                torch.tensor([frame.box], dtype=torch.float).expand(int(keep.sum()), 4),
            )
        )
    return MaskCandidates.cat(parts)


def _upsample(logits: torch.Tensor, input_size: tuple[int, int], crop_size: tuple[int, int]) -> torch.Tensor:
    """M x h' x w' low-res logits (the top-left corner of the 4h x 4w grid) -> M x H x W at crop size.

    `Sam.postprocess_masks` on the corner alone: the 4x upsampling has the same 1/4 scale, and the
    corner holds every cell it reads for the unpadded input.
    """
    rows, cols = logits.shape[-2:]
    x = F.interpolate(logits[:, None], (4 * rows, 4 * cols), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    if tuple(input_size) != tuple(crop_size):
        x = F.interpolate(x, tuple(crop_size), mode="bilinear", align_corners=False)
    return x[:, 0]


# ---------------------------------------------------------------------------------------------
# Records and shards: the data engine's fully automatic (or semi-automatic) labelling pass



def settings_from_config(cfg: DictConfig, semi_automatic: bool = False) -> AmgSettings:
    """`cfg.amg`, with `cfg.semi_automatic`'s stricter thresholds on top in semi-automatic mode."""
    node = OmegaConf.merge(cfg.amg, cfg.semi_automatic) if semi_automatic else cfg.amg
    return AmgSettings.from_config(node)


def label_image(
    model: Sam,
    image: np.ndarray,
    settings: AmgSettings,
    image_id: int,
    file_name: str,
    round: int,
    semi_automatic: bool = False,
    assisted: bool = False,
) -> dict:
    """The SA-1B record of an image's automatic masks, each with model provenance; in semi-automatic
    mode the record also says, as "uncovered", which pixels no mask covers (where people should look).
    In assisted-manual mode (SAM's first stage) the model proposes nothing: people label the image
    from scratch, clicking with the model's help, and the record holds the image alone."""
    found = MaskCandidates.empty() if assisted else find_masks(model, image, settings)
    if len(found) >= ANN_ID_STRIDE:
        raise ValueError(f"{len(found)} masks in one image: more than dataset-unique annotation ids allow")
    provenance = Provenance(source="model", round=round, time=now_iso()).as_json()
    annotations = annotations_of(found, first_id=image_id * ANN_ID_STRIDE)
    for ann in annotations:
        ann["provenance"] = dict(provenance)
    height, width = image.shape[:2]
    record = make_record(image_id, file_name, height, width, annotations)
    if semi_automatic:
        record["uncovered"] = uncovered_rle(found.rles, height, width)
    return record


def uncovered_rle(rles: Sequence[dict], height: int, width: int) -> dict:
    """COCO RLE (`{"size", "counts": str}`) of the pixels that none of the masks covers."""
    if not rles:
        return rle.encode(np.ones((height, width), dtype=bool, order="F"))
    covered = mask_utils.decode(mask_utils.merge(list(rles), intersect=False)).view(bool)
    return rle.encode(~covered)


def list_images(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files given directly (any name) and those under folders (any depth, by suffix), sorted, once each."""
    found: dict[Path, None] = {}
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for directory, subdirs, files in os.walk(path):
                subdirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        found[Path(directory) / name] = None
        elif path.is_file():
            found[path] = None
        else:
            raise FileNotFoundError(f"image source {path} does not exist")
    return list(found)


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, bytes, str]:
    """(H x W x 3 uint8 RGB pixels, the file's bytes, PIL format); ValueError naming the file if it cannot be used."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    pixels, fmt = decode_image(data, str(path))
    return pixels, data, fmt


def decode_image(data: bytes, where: str) -> tuple[np.ndarray, str]:
    """Image file bytes -> (H x W x 3 uint8 RGB pixels, PIL format); ValueError naming `where` if unusable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = str(image.format)
            pixels = np.asarray(image.convert("RGB"))  # decodes every byte: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: corrupt or unsupported image ({exc})") from exc
    return pixels, fmt


@dataclass(frozen=True)
class AutolabelJob:
    """What a labelling job is: worked out alike by every rank and by the step that finishes it."""

    items: list[tuple[int, tuple[str, Path]]]  # (image_id, (sample key, file)); ids follow key order
    duplicates: list[list[str]]  # [file, reason]: images whose sample key an earlier file took
    source: dict  # the manifest's "source": what a resume must match
    settings: AmgSettings
    samples_per_shard: int


def autolabel_job(
    model: Sam, images: Sequence[str | os.PathLike], cfg: DictConfig, round: int = 0, semi_automatic: bool = False,
    assisted: bool = False,
) -> AutolabelJob:
    """The labelling job of `images`: one sample per distinct key, numbered in key order (stable across reruns)."""
    settings = settings_from_config(cfg, semi_automatic)
    duplicates: list[list[str]] = []
    by_key: dict[str, Path] = {}
    for path in sorted((Path(p) for p in images), key=lambda p: (_sample_key(p), str(p))):
        key = _sample_key(path)
        if key in by_key:
            duplicates.append([str(path), f"sample key {key!r} is already taken by {by_key[key]}"])
        else:
            by_key[key] = path
    source = {
        "kind": "autolabel",
        "weights_sha256": weights_digest(model),
        "round": round,
        "semi_automatic": semi_automatic,
        "assisted": assisted,
        "amg": settings.as_json(),
        "images_sha256": hashlib.sha256("\n".join(f"{k}\t{p}" for k, p in by_key.items()).encode()).hexdigest(),
    }
    return AutolabelJob(list(enumerate(by_key.items())), duplicates, source, settings, int(cfg.output.samples_per_shard))


def autolabel_images(
    model: Sam,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: DictConfig,
    round: int = 0,
    semi_automatic: bool = False,
    rank: int = 0,
    world_size: int = 1,
    assisted: bool = False,
) -> dict:
    """Label image files with automatic masks into SA-1B webdataset shards + manifest under `out_dir`.

    One sample per image, key = file stem, members jpg (the file's bytes when it is a JPEG, else a
    re-encoding) and json (the record of `label_image`). Resumable: a rerun with the same model,
    images and settings keeps finished shards and labels only the rest; a different job refuses
    to write into the folder. Returns the manifest plus "run": what this call did, with every
    image it left out as [file, reason] (unreadable, corrupt, or a repeated sample key).

    With `world_size` > 1 this process is rank `rank` of a job whose processes share the shards
    (`write_shards`): it writes only its own and no manifest, and returns only "run";
    `finish_autolabel` writes the manifest once every rank is done.
    """
    job = autolabel_job(model, images, cfg, round, semi_automatic, assisted)
    run = {"labelled": 0, "masks": 0, "skipped": list(job.duplicates) if rank == 0 else []}  # said once per job
    quality = int(cfg.output.jpeg_quality)

    def make_sample(item: tuple[int, tuple[str, Path]]) -> tuple[str, dict[str, bytes]]:
        image_id, (key, path) = item
        pixels, data, fmt = load_image(path)
        try:
            record = label_image(model, pixels, job.settings, image_id, path.name, round, semi_automatic, assisted)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        run["labelled"] += 1
        run["masks"] += len(record["annotations"])
        jpeg = data if fmt == "JPEG" else _encode_jpeg(pixels, quality)
        return key, {"jpg": jpeg, "json": json.dumps(record, separators=(",", ":")).encode()}

    def on_skip(item: tuple[int, tuple[str, Path]], error: Exception) -> None:
        run["skipped"].append([_image_name(item), str(error)])

    manifest = write_share(out_dir, job.items, make_sample, job.samples_per_shard, job.source, "shard", on_skip,
                           _image_name, rank, world_size)
    return {**(manifest or {}), "run": run}


def finish_autolabel(
    model: Sam,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: DictConfig,
    round: int = 0,
    semi_automatic: bool = False,
    assisted: bool = False,
) -> dict:
    """Write the manifest of a job labelled by several ranks (the same arguments as theirs) once every
    shard exists; MissingShardsError names those that do not. Returns the manifest plus "skipped":
    every image the job left out, as [file, reason], whichever rank and run skipped it."""
    job = autolabel_job(model, images, cfg, round, semi_automatic, assisted)
    manifest = finish_dataset(out_dir, len(job.items), job.samples_per_shard, job.source)
    return {**manifest, "skipped": job.duplicates + skipped_items(manifest)}


def _image_name(item: tuple[int, tuple[str, Path]]) -> str:
    return str(item[1][1])


def _sample_key(path: Path) -> str:
    # Shard readers cut a member name at the basename's first dot: no dots (or slashes) in keys.
    return re.sub(r"[./\\]", "_", path.stem)


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()
