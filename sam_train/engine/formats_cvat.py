"""CVAT for images 1.1 XML (`annotations.xml`) as edits of the exported masks.

Shapes: `<mask>` (CVAT's own RLE inside its box, see `decode_cvat_rle`) and `<polygon>` are masks;
`<box>` and `<points>` are prompts for the model, one prompt per shape or per `group_id` (a box
and its clicks grouped in CVAT); points labelled "negative" or "background" are negative clicks. A shape's
`<attribute name="sam_id">` (set by our COCO export) links it to a model mask. Provenance: the
job's (else task's) assignee is the annotator, `job/<id>` or `task/<id>` the task id,
`<dumped>` the time; a new shape CVAT marks `source="auto"` came from a model. The rules that
turn shapes into edits are in `sam_train.engine.formats`.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from xml.parsers import expat

import numpy as np

from sam_train.data import rle
from sam_train.data.convert import Skipped
from sam_train.engine.formats import (
    Returned,
    image_edits,
    image_key,
    image_size_problem,
    mask_rle,
    parse_sam_id,
    parse_time,
)
from sam_train.engine.records import NEGATIVE_LABELS, Ingested, Prompt, Provenance, now_iso

_PROMPT_SHAPES = ("box", "points")


def decode_cvat_rle(counts: Sequence[int], width: int, height: int) -> np.ndarray:
    """height x width bool mask of CVAT's mask RLE: run lengths over its box, row by row, background first."""
    runs = np.asarray(counts, dtype=np.int64)
    if runs.size == 0 or runs.min() < 0:
        raise ValueError("rle must be non-negative run lengths")
    if int(runs.sum()) != width * height:
        raise ValueError(f"rle runs cover {int(runs.sum())} pixels, its {width}x{height} box has {width * height}")
    return np.repeat(np.arange(runs.size) % 2 == 1, runs).reshape(height, width)


def parse_xml(data: bytes) -> ET.Element:
    """The root of an XML document; a DOCTYPE is refused, and with it every entity (no XXE, no entity bomb)."""

    def refuse(*_: object) -> None:
        raise ValueError("declares a DOCTYPE; DTDs and entities are refused (XXE)")

    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise ValueError(f"malformed XML ({exc})") from exc
    return builder.close()


def ingest_cvat(
    path: str | os.PathLike,
    records: dict[str, dict],
    *,
    complete: bool,
    round: int,
    annotator: str | None = None,
) -> Ingested:
    """Edits from a CVAT for images 1.1 `annotations.xml` of exported images (matched by `<key>.jpg`).

    `complete=True` says each listed image holds every mask a person kept, so an exported mask no
    shape names is deleted. `annotator` stands in when the file names no assignee.
    """
    path = Path(path)
    try:
        root = parse_xml(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if root.tag != "annotations":
        raise ValueError(f"{path}: not CVAT XML (root element <{root.tag}>, expected <annotations>)")
    task_id, assignee, stated_time = _meta(root.find("meta"))
    result = Ingested()
    for track in root.findall("track"):
        reason = "tracks are CVAT for video; export as CVAT for images 1.1"
        result.skipped.append((f"{path}: track {track.get('id')}", reason))
    seen: set[str] = set()
    for image in root.findall("image"):
        name = image.get("name") or ""
        item = f"{path}: image {name!r}"
        key = image_key(name)
        try:
            size = int(image.get("width", "")), int(image.get("height", ""))
        except ValueError:
            reason = f"width {image.get('width')!r} and height {image.get('height')!r} are not integers"
            result.skipped.append((item, reason))
            continue
        problem = (
            "is not among the exported images" if key not in records
            else f"names image {key!r} a second time" if key in seen
            else image_size_problem(records[key], *size)
        )
        if problem is not None:
            result.skipped.append((item, problem))
            continue
        seen.add(key)
        # A project export says which task each image is from.
        image_task = f"task/{image.get('task_id')}" if image.get("task_id") else task_id
        time = stated_time or now_iso()
        image_provenance = Provenance("human", round, assignee or annotator, image_task, time)
        returned, left_out = _image_shapes(image, item, size, image_provenance, result.skipped)
        edits, withheld = image_edits(key, records[key], returned, image_provenance, complete, left_out)
        result.edits += edits
        if withheld is not None:
            result.skipped.append((item, withheld))
    return result


def _image_shapes(
    image: ET.Element, item: str, size: tuple[int, int], human: Provenance, skipped: Skipped
) -> tuple[list[Returned], list[str | None]]:
    """An image's shapes as returned masks and prompts, and the raw sam_ids of shapes left out."""
    width, height = size
    model = replace(human, source="model", annotator=None)
    returned, left_out = [], []
    prompt_parts: dict[tuple[str, int], list[tuple[int, ET.Element]]] = {}
    for index, shape in enumerate(image):
        attributes = {a.get("name"): a.text or "" for a in shape.findall("attribute")}
        shape_item = f"{item} <{shape.tag}> #{index}"
        try:
            claimed = parse_sam_id(attributes.get("sam_id"))
            if shape.tag == "mask":
                mask = _mask_rle(shape, width, height)
            elif shape.tag == "polygon":
                points = _points(shape.get("points"))
                if len(points) < 3:
                    raise ValueError(f"polygon has {len(points)} points, needs at least 3")
                mask = mask_rle([[v for point in points for v in point]], height, width)
            elif shape.tag in _PROMPT_SHAPES:
                group = int(shape.get("group_id") or 0)
                prompt_parts.setdefault(("group", group) if group else ("shape", index), []).append((index, shape))
                continue
            else:
                raise ValueError(f"<{shape.tag}> is not supported (mask, polygon, box and points are)")
        except ValueError as exc:
            skipped.append((shape_item, str(exc)))
            left_out.append(attributes.get("sam_id"))
            continue
        provenance = model if shape.get("source") == "auto" and claimed is None else human
        label, extra = shape.get("label"), {"cvat_shape": shape.tag}
        returned.append(Returned(shape_item, provenance, rle=mask, sam_id=claimed, label=label, extra=extra))
    for parts in prompt_parts.values():
        parts_item = f"{item} " + ", ".join(f"<{shape.tag}> #{index}" for index, shape in parts)
        try:
            prompt = _prompt([shape for _, shape in parts], width, height)
        except ValueError as exc:
            skipped.append((parts_item, str(exc)))
            continue
        label = parts[0][1].get("label")
        returned.append(Returned(parts_item, human, prompt=prompt, label=label, extra={"cvat_shape": "prompt"}))
    return returned, left_out


def _mask_rle(shape: ET.Element, width: int, height: int) -> dict:
    """COCO RLE at the image's size of a CVAT `<mask>`; ValueError if its box leaves the image or it is empty."""
    try:
        left, top, box_w, box_h = (int(shape.get(k, "")) for k in ("left", "top", "width", "height"))
        counts = [int(v) for v in (shape.get("rle") or "").split(",")]
    except ValueError:
        raise ValueError("rle, left, top, width and height must be integers") from None
    if box_w < 1 or box_h < 1 or left < 0 or top < 0 or left + box_w > width or top + box_h > height:
        raise ValueError(f"mask box {box_w}x{box_h} at ({left}, {top}) lies outside the {width}x{height} image")
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + box_h, left : left + box_w] = decode_cvat_rle(counts, box_w, box_h)
    if not mask.any():
        raise ValueError("empty mask")
    return rle.encode(mask)


def _prompt(shapes: list[ET.Element], width: int, height: int) -> Prompt:
    """One prompt from a box and/or point shapes; ValueError if a coordinate leaves the image."""
    boxes = [s for s in shapes if s.tag == "box"]
    if len(boxes) > 1:
        raise ValueError(f"a group holds {len(boxes)} boxes, a prompt takes one")
    box = None
    if boxes:
        if float(boxes[0].get("rotation") or 0) != 0:
            raise ValueError("a rotated box cannot be a prompt")
        try:
            box = tuple(float(boxes[0].get(k, "")) for k in ("xtl", "ytl", "xbr", "ybr"))
        except ValueError:
            raise ValueError("box corners xtl, ytl, xbr, ybr must be numbers") from None
        if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            raise ValueError(f"box {box} is empty or leaves the {width}x{height} image")
    points, labels = [], []
    for shape in shapes:
        if shape.tag == "points":
            clicks = _points(shape.get("points"))
            outside = [p for p in clicks if not (0 <= p[0] <= width and 0 <= p[1] <= height)]
            if outside:
                raise ValueError(f"point {outside[0]} lies outside the {width}x{height} image")
            points += clicks
            labels += [0 if shape.get("label") in NEGATIVE_LABELS else 1] * len(clicks)
    return Prompt(box=box, points=tuple(points), labels=tuple(labels))


def _points(text: str | None) -> list[tuple[float, float]]:
    """CVAT's "x0,y0;x1,y1;..." as (x, y) pairs; ValueError if it is not that."""
    try:
        pairs = [tuple(float(v) for v in pair.split(",")) for pair in (text or "").split(";")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or not np.isfinite(p).all() for p in pairs):
        raise ValueError(f"points {text!r} are not 'x0,y0;x1,y1;...'")
    return pairs


def _meta(meta: ET.Element | None) -> tuple[str | None, str | None, str | None]:
    """(task id, assignee, dump time) from `<meta>`: a job export's own, else its task's."""
    if meta is None:
        return None, None, None
    for kind in ("job", "task"):
        node = meta.find(kind)
        if node is not None:
            ident = (node.findtext("id") or "").strip()
            assignee = (node.findtext("assignee/username") or "").strip()
            return (f"{kind}/{ident}" if ident else None), assignee or None, parse_time(meta.findtext("dumped"))
    return None, None, parse_time(meta.findtext("dumped"))
