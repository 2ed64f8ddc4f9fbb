"""COCO JSON for correction in CVAT (or any COCO tool), and its ingestion back into edits.

The export is a COCO instances file CVAT's "COCO 1.0" importer reads as masks: each annotation
holds a compressed RLE with `iscrowd: 1` (CVAT exports a shape as RLE only when its `is_crowd`
is set, so the flag keeps holes on the way back; its importer needs the field, and takes any
RLE as a mask), `id` = our annotation id, `score` = predicted IoU, and `attributes`
{sam_id, source, round, stability_score}. CVAT keeps an attribute only if the task's label
declares it: create the task with `CVAT_LABELS` (paste into the label constructor's Raw tab), and
where the upload dialog offers "convert masks to polygons", untick it, or holes are lost.
Ingestion rules are in `sam_train.engine.formats`.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from sam_train.atomic_io import atomic_write_bytes
from sam_train.data import rle, sa1b
from sam_train.data.convert import _coco_image_problem, _is_int, _load_coco
from sam_train.engine.formats import (
    Returned,
    image_edits,
    image_key,
    image_size_problem,
    mask_rle,
    parse_sam_id,
    parse_time,
)
from sam_train.engine.records import Ingested, Provenance, now_iso

LABEL = "object"  # the one category: SAM masks are class-agnostic
EXPORT_DESCRIPTION = "sam_train data engine export"
_TEXT = {"mutable": False, "input_type": "text", "default_value": "", "values": [""]}
# is_crowd defaults to true so that CVAT's COCO export keeps new brush masks as RLE, holes and all.
_CROWD = {"name": "is_crowd", "mutable": False, "input_type": "checkbox", "default_value": "true", "values": ["true"]}
# The task label CVAT needs to keep our attributes (it drops undeclared ones on import).
CVAT_LABELS = [
    {
        "name": LABEL,
        "type": "any",
        "attributes": [{"name": name, **_TEXT} for name in ("sam_id", "score", "round", "stability_score")] + [_CROWD],
    }
]


def export_coco(records: dict[str, dict], path: str | os.PathLike) -> None:
    """Write the SA-1B `records` (key -> record) as one COCO JSON a person corrects in CVAT; atomic.

    ValueError names the image and annotation when a record cannot round-trip: a mask of the
    wrong size or empty (CVAT's importer fails on it), an id repeated (ids link corrections back).
    """
    images, annotations, owner = [], [], {}
    for image_id, key in enumerate(sorted(records), start=1):
        record = records[key]
        try:
            sa1b.validate_record(record, check_annotations=False)
        except ValueError as exc:
            raise ValueError(f"image {key!r}: {exc}") from exc
        height, width = record["image"]["height"], record["image"]["width"]
        images.append({"id": image_id, "file_name": f"{key}.jpg", "width": width, "height": height})
        for ann in record["annotations"]:
            ann_id = ann.get("id")
            if not _is_int(ann_id):
                raise ValueError(f"image {key!r}: an annotation has no integer id ({ann_id!r})")
            if ann_id in owner:
                raise ValueError(f"annotation id {ann_id} of image {key!r} repeats one of image {owner[ann_id]!r}")
            owner[ann_id] = key
            try:
                annotations.append(_coco_annotation(ann, image_id, height, width))
            except ValueError as exc:
                raise ValueError(f"image {key!r} annotation {ann_id}: {exc}") from exc
    coco = {
        # No date_created: ingestion reads a file's date as the correction time, and a hand-edited
        # export would still carry the export's.
        "info": {"description": EXPORT_DESCRIPTION, "version": "1.0"},
        "licenses": [],
        "categories": [{"id": 1, "name": LABEL, "supercategory": ""}],
        "images": images,
        "annotations": annotations,
    }
    atomic_write_bytes(path, json.dumps(coco, separators=(",", ":")).encode())


def ingest_coco(
    path: str | os.PathLike,
    records: dict[str, dict],
    *,
    complete: bool,
    round: int,
    annotator: str | None = None,
) -> Ingested:
    """Edits from a corrected COCO JSON (polygons, compressed or uncompressed RLE) of exported images.

    `complete=True` says the file holds every mask a person kept on each image it lists, so an
    exported mask no annotation names is deleted; with False nothing is deleted. Images are
    matched by file name (`<key>.jpg`), masks by `attributes.sam_id` (a tool may renumber `id`).
    """
    path = Path(path)
    coco = _load_coco(path)
    result = Ingested()
    names = {c.get("id"): c.get("name") for c in coco.get("categories") or [] if isinstance(c, dict)}
    info = coco.get("info")
    stated_time = parse_time(info.get("date_created")) if isinstance(info, dict) else None
    images: dict[int, tuple[str, dict]] = {}
    keys: set[str] = set()
    for i, entry in enumerate(coco["images"]):
        name = entry.get("file_name") if isinstance(entry, dict) else None
        problem = _coco_image_problem(entry) or _match_problem(entry, images, keys, records)
        if problem is not None:
            result.skipped.append((f"{path}: image {name if isinstance(name, str) else f'#{i}'!r}", problem))
        else:
            images[entry["id"]] = (image_key(name), entry)
            keys.add(image_key(name))
    listed = {entry.get("id") for entry in coco["images"] if isinstance(entry, dict)}
    by_image: dict[int, list[dict]] = defaultdict(list)  # only annotation objects of usable images
    orphans: list[Any] = []
    for i, ann in enumerate(coco.get("annotations") or []):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id in images:
            by_image[image_id].append(ann)
        elif image_id not in listed:  # a skipped image's annotations go with its own report
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            item = f"{path}: annotation {ann_id if ann_id is not None else f'#{i}'}"
            result.skipped.append((item, f"refers to unknown image id {image_id!r}"))
            orphans.append(_sam_id_value(ann))  # ids are unique across an export: keep what it names
    for image_id, (key, entry) in images.items():
        record = records[key]
        provenance = Provenance("human", round, annotator, str(image_id), stated_time or now_iso())
        returned, left_out = [], list(orphans)
        for ann in by_image[image_id]:
            item = f"{path}: image {entry['file_name']!r} annotation {ann.get('id')}"
            try:
                returned.append(_returned(ann, item, record, provenance, names))
            except ValueError as exc:
                result.skipped.append((item, str(exc)))
                left_out.append(_sam_id_value(ann))
        edits, withheld = image_edits(key, record, returned, provenance, complete, left_out)
        result.edits += edits
        if withheld is not None:
            result.skipped.append((f"{path}: image {entry['file_name']!r}", withheld))
    return result


def _match_problem(
    entry: dict, matched: dict[int, tuple[str, dict]], keys: set[str], records: dict[str, dict]
) -> str | None:
    """Why a well-formed COCO image entry does not name one exported image once, at its size; else None."""
    key = image_key(entry["file_name"])
    if entry["id"] in matched:
        return f"repeats image id {entry['id']}"
    if key not in records:
        return "is not among the exported images"
    if key in keys:
        return f"names image {key!r} a second time"
    return image_size_problem(records[key], entry["width"], entry["height"])


def _coco_annotation(ann: dict, image_id: int, height: int, width: int) -> dict:
    """One SA-1B annotation as a COCO annotation CVAT imports as a mask with our id and scores."""
    segmentation = ann.get("segmentation")
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise ValueError("segmentation is not an RLE")
    rle.validated_counts(segmentation, height, width)
    counts = segmentation["counts"]
    compressed = (
        mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, list)
        else {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    )
    area = int(mask_utils.area(compressed))
    if area == 0:
        raise ValueError("empty mask (CVAT cannot import it)")
    provenance = ann.get("provenance") if isinstance(ann.get("provenance"), dict) else {}
    attributes: dict[str, Any] = {
        "sam_id": ann["id"],
        # CVAT reads `source` as the shape's origin: model masks show as automatic.
        "source": "manual" if provenance.get("source") == "human" else "auto",
    }
    if "round" in provenance:
        attributes["round"] = provenance["round"]
    if "stability_score" in ann:
        attributes["stability_score"] = ann["stability_score"]
    out = {
        "id": ann["id"],
        "image_id": image_id,
        "category_id": 1,
        "segmentation": {"size": [height, width], "counts": compressed["counts"].decode("ascii")},
        "area": area,
        "bbox": [float(v) for v in mask_utils.toBbox(compressed)],
        "iscrowd": 1,
        "attributes": attributes,
    }
    if "predicted_iou" in ann:
        out["score"] = ann["predicted_iou"]
    return out


def _returned(ann: dict, item: str, record: dict, image: Provenance, names: dict) -> Returned:
    """One COCO annotation as a returned shape; ValueError says why it cannot be used."""
    if not _is_int(ann.get("id")):
        raise ValueError("has no integer id")
    attributes = ann.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValueError(f"attributes is not an object ({attributes!r})")
    claimed = parse_sam_id(attributes.get("sam_id"))
    mask = mask_rle(ann.get("segmentation"), record["image"]["height"], record["image"]["width"])
    # "auto" marks a model's shape; on a shape that claims one of our masks it is our own
    # export's mark, and a change to that mask was made during correction.
    from_model = attributes.get("source") == "auto" and claimed is None
    provenance = replace(image, source="model", annotator=None) if from_model else image
    label = names.get(ann.get("category_id"))
    return Returned(item, provenance, rle=mask, sam_id=claimed, label=label, extra={"coco_id": ann["id"]})


def _sam_id_value(ann: Any) -> Any:
    """The raw `attributes.sam_id` of an annotation, None if it has none."""
    attributes = ann.get("attributes") if isinstance(ann, dict) else None
    return attributes.get("sam_id") if isinstance(attributes, dict) else None
