"""Interchange formats of the data engine: what every exporter and ingester shares, and SA-1B ingestion.

An image is named by its sample key; exported files call it `<key>.jpg`. A model mask is named by
its SA-1B annotation `id`, which an export carries as the attribute `sam_id` (CVAT renumbers a
file's own annotation ids, attributes survive). Ingesting a correction file compares what came
back with the records that were exported (`records`: key -> SA-1B record) and yields `Edit`s:

- a mask that names an exported `sam_id` of its image: `replace` if its pixels differ, nothing if not;
- any other mask: `add` (a `sam_id` already claimed, or not of this image, is a copied shape);
- with `complete=True` (the file is the whole corrected set of masks of every image it lists),
  an exported mask no shape names: `delete`; images the file does not list are left alone.

Every ingester takes the engine `round` the corrections belong to, and an `annotator` for files
that name none. Provenance is "human" unless the file says a model made the shape.

A bad image or annotation is left out and reported as (item, reason), the item naming the file,
the image and the annotation; the ids it names are never deleted. Masks never pass through
contours, so a hole stays a hole. Formats: `formats_coco` (COCO JSON, export and ingest),
`formats_cvat` (CVAT for images 1.1 XML), and SA-1B JSON here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from numbers import Real
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sam_train.data import rle, sa1b
from sam_train.data.convert import Skipped, coco_mask
from sam_train.engine.records import Edit, Ingested, Prompt, Provenance, now_iso


@dataclass(frozen=True)
class Returned:
    """One shape as a correction file gives it back, before it is compared with the export."""

    item: str  # how reports name it: file, image, annotation
    provenance: Provenance
    rle: dict | None = None  # compressed RLE at the image's size, from `mask_rle`
    prompt: Prompt | None = None
    sam_id: int | None = None  # the exported model mask it says it is
    label: str | None = None
    extra: dict = field(default_factory=dict)


def image_edits(
    key: str,
    record: dict,
    returned: Sequence[Returned],
    provenance: Provenance,
    complete: bool = False,
    left_out: Iterable[Any] = (),
) -> tuple[list[Edit], str | None]:
    """The edits that turn the exported `record` of image `key` into what came back for it.

    `left_out` are the raw `sam_id` values of shapes left out as unusable: the person kept
    something there, so the masks they name are never deleted, and if one cannot be read no mask
    is (the second value then says why). `provenance` is the deletions' (the image's).
    """
    height, width = record["image"]["height"], record["image"]["width"]
    exported = {ann["id"]: ann for ann in record["annotations"]}
    kept: set[int] = set()
    withheld = None
    for value in left_out:
        try:
            named = parse_sam_id(value)
        except ValueError:
            withheld = f"no deletions: a left-out shape names sam_id {value!r}, so which mask it keeps is unknown"
            continue
        if named is not None:
            kept.add(named)
    claimed: set[int] = set()
    edits = []
    for shape in returned:
        common = dict(image=key, provenance=shape.provenance, label=shape.label, extra=shape.extra)
        if shape.prompt is not None:
            edits.append(Edit(action="add", prompt=shape.prompt, **common))
        elif shape.sam_id in exported and shape.sam_id not in claimed:
            claimed.add(shape.sam_id)
            if shape.rle["counts"] != _canonical_counts(exported[shape.sam_id]["segmentation"], height, width):
                edits.append(Edit(action="replace", rle=shape.rle, target=shape.sam_id, **common))
        else:
            edits.append(Edit(action="add", rle=shape.rle, **common))
    if not complete:
        return edits, None
    if withheld is None:
        gone = [i for i in exported if i not in claimed | kept]
        edits += [Edit(image=key, action="delete", target=i, provenance=provenance) for i in gone]
    return edits, withheld


def mask_rle(segmentation: Any, height: int, width: int) -> dict:
    """Canonical compressed RLE of a COCO segmentation (polygons, RLE) inside a height x width image.

    ValueError names the problem: a vertex outside the image, an RLE of another size, an empty mask.
    """
    if isinstance(segmentation, list):
        for j, polygon in enumerate(segmentation):
            if isinstance(polygon, list) and all(isinstance(v, Real) for v in polygon):
                xs, ys = np.asarray(polygon[0::2], float), np.asarray(polygon[1::2], float)
                outside = ~np.isfinite(xs) | ~np.isfinite(ys) | (xs < 0) | (xs > width) | (ys < 0) | (ys > height)
                if outside.any():
                    k = int(np.argmax(outside))
                    vertex = f"({xs[k]:g}, {ys[k]:g})"
                    raise ValueError(f"polygon {j} vertex {vertex} lies outside the {width}x{height} image")
    return rle.encode(coco_mask(segmentation, height, width))


def parse_sam_id(value: Any) -> int | None:
    """The model annotation id an attribute names: int, integral float or decimal text; None if absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"sam_id {value!r} is not an annotation id")
    if isinstance(value, str):
        value = value.strip()
        if value.lstrip("-").isdigit():
            return int(value)
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"sam_id {value!r} is not an annotation id") from None
    if isinstance(value, Real) and float(value).is_integer():
        return int(value)
    raise ValueError(f"sam_id {value!r} is not an annotation id")


def parse_time(text: Any) -> str | None:
    """A file's stated time as ISO 8601 UTC to the second (a zone-less time is taken as UTC); None if unreadable."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        stated = datetime.fromisoformat(text.strip().replace("/", "-"))
    except ValueError:
        return None
    if stated.tzinfo is None:
        stated = stated.replace(tzinfo=timezone.utc)
    return stated.astimezone(timezone.utc).replace(microsecond=0).isoformat()


def image_key(name: str) -> str:
    """The sample key of an exported file name: `<key>.jpg`, possibly under folders a tool added."""
    return PurePosixPath(name.replace("\\", "/")).stem


def image_size_problem(record: dict, width: Any, height: Any) -> str | None:
    """Why a file's stated image size disagrees with the exported record, else None."""
    expected = (record["image"]["width"], record["image"]["height"])
    if (width, height) != expected:
        return f"is {width}x{height} in the file but the exported image is {expected[0]}x{expected[1]}"
    return None


def ingest_sa1b(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    records: dict[str, dict],
    *,
    round: int,
    annotator: str | None = None,
) -> Ingested:
    """Masks from SA-1B JSON files (one per image, `<key>.json`; folders are searched) as edits.

    Every annotation is an `add`, unless its `provenance.corrects` names an exported mask id of
    that image: then it `replace`s that mask. Its own `id` never implies a replacement (another
    pipeline's ids mean nothing here). `provenance.source/annotator/task_id/time` are kept when
    given; the source is "human" otherwise. An unreadable file or annotation is skipped and reported.
    """
    result = Ingested()
    for path in _json_files(sources):
        try:
            record = sa1b.parse_record(path.read_bytes(), check_annotations=False)
        except OSError as exc:
            result.skipped.append((str(path), f"cannot read ({exc.strerror or exc})"))
            continue
        except ValueError as exc:
            result.skipped.append((str(path), str(exc)))
            continue
        key = path.stem
        exported = records.get(key)
        if exported is None:
            result.skipped.append((f"{path}: image {key!r}", "is not among the exported images"))
            continue
        problem = image_size_problem(exported, record["image"]["width"], record["image"]["height"])
        if problem is not None:
            result.skipped.append((f"{path}: image {key!r}", problem))
            continue
        returned = []
        for i, ann in enumerate(record["annotations"]):
            shape = _sa1b_shape(f"{path}: image {key!r}", ann, i, exported, round, annotator, result.skipped)
            if shape is not None:
                returned.append(shape)
        # No deletions: an SA-1B file adds and corrects masks, it does not list the survivors.
        result.edits += image_edits(key, exported, returned, Provenance("human", round))[0]
    return result


def _sa1b_shape(
    image: str, ann: Any, index: int, exported: dict, round: int, annotator: str | None, skipped: Skipped
) -> Returned | None:
    """One SA-1B annotation as a returned shape; None (and a report) if it cannot be used."""
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    item = f"{image} annotation {ann_id if ann_id is not None else f'#{index}'}"
    try:
        if not isinstance(ann, dict) or not isinstance(ann_id, int) or isinstance(ann_id, bool):
            raise ValueError("has no integer id")
        stated = ann.get("provenance") or {}
        if not isinstance(stated, dict):
            raise ValueError(f"provenance is not an object ({stated!r})")
        corrects = parse_sam_id(stated.get("corrects"))
        if corrects is not None and corrects not in {a["id"] for a in exported["annotations"]}:
            raise ValueError(f"provenance.corrects names mask {corrects}, which the exported image does not have")
        height, width = exported["image"]["height"], exported["image"]["width"]
        mask = mask_rle(ann.get("segmentation"), height, width)
    except ValueError as exc:
        skipped.append((item, str(exc)))
        return None
    source = stated.get("source") if stated.get("source") in ("model", "human") else "human"
    provenance = Provenance(
        source,
        round,
        stated.get("annotator") or (annotator if source == "human" else None),
        None if stated.get("task_id") is None else str(stated["task_id"]),
        parse_time(stated.get("time")) or now_iso(),
    )
    return Returned(item, provenance, rle=mask, sam_id=corrects, extra={"sa1b_id": ann_id})


def _json_files(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The JSON files named, and those under the folders named (any depth), in name order."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(source.rglob("*.json"))
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"SA-1B correction source {source} does not exist")
    return files


def _canonical_counts(segmentation: Any, height: int, width: int) -> str | None:
    """The exported mask re-encoded canonically (another encoder's RLE may differ in form, not pixels)."""
    try:
        return rle.encode(coco_mask(segmentation, height, width))["counts"]
    except ValueError:
        return None
