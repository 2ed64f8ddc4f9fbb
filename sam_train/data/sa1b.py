"""SA-1B's per-image JSON: build it, parse it, validate it.

One record per image:
    {"image": {"image_id", "width", "height", "file_name"},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str}, "bbox": [x, y, w, h],
                      "area", "predicted_iou", "stability_score", "point_coords": [[x, y]],
                      "crop_box": [x, y, w, h]}, ...]}
Every shard we write uses exactly this schema, so raw SA-1B tars and our shards share one reader.
"""

from __future__ import annotations

import json
from numbers import Real
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam_train.data import rle

SCHEMA_VERSION = 1
_ANNOTATION_FIELDS = ("segmentation", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box")


def make_annotation(
    mask: np.ndarray,
    ann_id: int,
    predicted_iou: float = 1.0,
    stability_score: float = 1.0,
    point_coords: list[list[float]] | None = None,
    crop_box: list[float] | None = None,
) -> dict:
    """An SA-1B annotation for a boolean mask; bbox and area come from the mask itself.

    Human-made masks get predicted_iou = stability_score = 1 and, as point, the mask pixel
    nearest its centroid; crop_box defaults to the whole image.
    """
    encoded = rle.encode(mask)
    compressed = {"size": encoded["size"], "counts": encoded["counts"].encode("ascii")}
    bbox = [float(v) for v in mask_utils.toBbox(compressed)]
    if point_coords is None:
        x0, y0 = int(bbox[0]), int(bbox[1])
        ys, xs = np.nonzero(mask[y0 : y0 + int(bbox[3]), x0 : x0 + int(bbox[2])])
        k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)) if xs.size else 0
        point_coords = [[float(x0 + xs[k]), float(y0 + ys[k])]] if xs.size else []
    return {
        "id": int(ann_id),
        "segmentation": encoded,
        "bbox": bbox,
        "area": int(mask_utils.area(compressed)),
        "predicted_iou": float(predicted_iou),
        "stability_score": float(stability_score),
        "point_coords": point_coords,
        "crop_box": crop_box if crop_box is not None else [0.0, 0.0, float(mask.shape[1]), float(mask.shape[0])],
    }


def make_record(image_id: int, file_name: str, height: int, width: int, annotations: list[dict]) -> dict:
    """An SA-1B image record."""
    return {
        "image": {"image_id": int(image_id), "width": int(width), "height": int(height), "file_name": file_name},
        "annotations": annotations,
    }


def parse_record(data: bytes, check_annotations: bool = True) -> dict:
    """Parse and validate SA-1B JSON bytes; raises ValueError with the reason.

    The training pipeline passes `check_annotations=False` and checks only the annotations it
    uses, as it uses them; `data check` and the converters check all of them.
    """
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed JSON ({exc})") from exc
    validate_record(record, check_annotations)
    return record


def validate_record(record: Any, check_annotations: bool = True) -> None:
    """Check structure and types of an SA-1B record (cheap: no mask is decoded)."""
    if not isinstance(record, dict) or not isinstance(record.get("image"), dict):
        raise ValueError("JSON has no 'image' object")
    image = record["image"]
    for name in ("width", "height"):
        if not isinstance(image.get(name), int) or image[name] <= 0:
            raise ValueError(f"image.{name} must be a positive integer, got {image.get(name)!r}")
    annotations = record.get("annotations")
    if not isinstance(annotations, list):
        raise ValueError("JSON has no 'annotations' list")
    for i, ann in enumerate(annotations if check_annotations else ()):
        if not isinstance(ann, dict):
            raise ValueError(f"annotation {i} is not an object")
        missing = [f for f in _ANNOTATION_FIELDS if f not in ann]
        if missing:
            raise ValueError(f"annotation {i} lacks {', '.join(missing)}")
        seg = ann["segmentation"]
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise ValueError(f"annotation {i}: segmentation is not an RLE with size and counts")
        if not _is_numbers(ann["bbox"], 4) or not _is_numbers(ann["crop_box"], 4):
            raise ValueError(f"annotation {i}: bbox and crop_box must be 4 numbers")
        if not all(isinstance(ann[f], Real) for f in ("area", "predicted_iou", "stability_score")):
            raise ValueError(f"annotation {i}: area, predicted_iou and stability_score must be numbers")


def check_annotation(ann: dict, height: int, width: int) -> None:
    """Deep check of one annotation against its image: RLE size and runs, area, bbox, non-empty."""
    counts = rle.validated_counts(ann["segmentation"], height, width)
    area = int(counts[1::2].sum())
    if area == 0:
        raise ValueError("empty mask")
    if int(round(ann["area"])) != area:
        raise ValueError(f"area {ann['area']} but the mask has {area} pixels")
    compressed = {"size": [height, width], "counts": ann["segmentation"]["counts"]}
    if isinstance(compressed["counts"], str):
        compressed["counts"] = compressed["counts"].encode("ascii")
    elif isinstance(compressed["counts"], list):
        compressed = mask_utils.frPyObjects(compressed, height, width)
    expected = mask_utils.toBbox(compressed)
    if np.abs(np.asarray(ann["bbox"], dtype=np.float64) - expected).max() > 1.0:
        raise ValueError(f"bbox {ann['bbox']} but the mask spans {[float(v) for v in expected]}")


def _is_numbers(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, Real) for v in value)
