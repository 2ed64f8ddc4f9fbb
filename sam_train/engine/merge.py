"""Apply people's edits to an image's model masks: the one place where corrections become labels.

Rules, so that nothing a person made is dropped silently:
- `replace` k: the person's mask supersedes annotation k; it gets a new id and records
  `provenance.corrects = k`. If k is gone (already replaced or deleted), the mask is still kept,
  as an addition, and the report says so.
- `delete` k: annotation k goes. Deleting what is already gone is reported, not an error.
- `add`: a new annotation; a prompt (box / clicks) is segmented by the caller's model first.
- an edit that cannot be applied (wrong image size, empty mask, prompt without a model) is
  reported with the reason; the image's other edits still apply.
Ids are never reused: a new annotation takes one past every id the image has ever had.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from sam_train.data.sa1b import make_annotation
from sam_train.engine.records import ANN_ID_STRIDE, Edit, Prompt

# Segments a prompt on the image being edited: (H x W bool mask, the model's predicted IoU).
Segmenter = Callable[[Prompt], tuple[np.ndarray, float]]


@dataclass
class MergeReport:
    """What happened to each edit of one image."""

    added: int = 0
    replaced: int = 0
    deleted: int = 0
    problems: list[str] = field(default_factory=list)  # edits kept differently or not applied, with why


def apply_edits(record: dict, key: str, edits: Sequence[Edit], segment: Segmenter | None = None) -> tuple[dict, MergeReport]:
    """A new SA-1B record: `record` (model masks) with the edits of image `key` applied, and the report."""
    out = copy.deepcopy(record)
    report = MergeReport()
    height, width = out["image"]["height"], out["image"]["width"]
    annotations = {ann["id"]: ann for ann in out["annotations"]}
    # New masks take ids in the image's block (see ANN_ID_STRIDE), after every id it has or had.
    first = out["image"]["image_id"] * ANN_ID_STRIDE
    next_id = 1 + max([*annotations, *(e.target for e in edits if e.target is not None), first - 1])
    for n, edit in enumerate(edits):
        where = f"{key} edit {n} ({edit.action}{'' if edit.target is None else f' of mask {edit.target}'})"
        if edit.image != key:
            raise ValueError(f"{where}: the edit is for image {edit.image!r}")
        if edit.action == "delete":
            if annotations.pop(edit.target, None) is None:
                report.problems.append(f"{where}: no mask {edit.target} to delete (already gone)")
            else:
                report.deleted += 1
            continue
        try:
            mask, predicted_iou = _edit_mask(edit, height, width, segment)
        except ValueError as exc:
            report.problems.append(f"{where}: not applied: {exc}")
            continue
        provenance = edit.provenance.as_json()
        if edit.prompt is not None:
            provenance["prompt"] = asdict(edit.prompt)
        if edit.action == "replace":
            if annotations.pop(edit.target, None) is None:
                report.problems.append(f"{where}: mask {edit.target} is gone; the person's mask is kept as a new mask")
                report.added += 1
            else:
                provenance["corrects"] = edit.target
                report.replaced += 1
        else:
            report.added += 1
        annotation = make_annotation(mask, next_id, predicted_iou=predicted_iou, stability_score=1.0)
        annotation["provenance"] = provenance
        annotations[next_id] = annotation
        next_id += 1
    out["annotations"] = sorted(annotations.values(), key=lambda ann: ann["id"])
    return out, report


def _edit_mask(edit: Edit, height: int, width: int, segment: Segmenter | None) -> tuple[np.ndarray, float]:
    """The full-size bool mask an add/replace edit carries (or its prompt yields), and its predicted IoU."""
    if edit.prompt is not None:
        if segment is None:
            raise ValueError("a prompt needs a model to segment it")
        mask, predicted_iou = segment(edit.prompt)
    else:
        size = edit.rle.get("size") if isinstance(edit.rle, dict) else None
        if size is None or (int(size[0]), int(size[1])) != (height, width):
            raise ValueError(f"mask size {size} does not match the image's {[height, width]}")
        counts = edit.rle["counts"]
        mask = mask_utils.decode({"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts})
        mask, predicted_iou = mask.astype(bool), 1.0  # a person's mask: certain by definition
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} does not match the image's {(height, width)}")
    if not mask.any():
        raise ValueError("empty mask")
    return np.asfortranarray(mask), float(predicted_iou)
