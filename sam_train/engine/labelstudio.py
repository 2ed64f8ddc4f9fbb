"""Correcting masks in Label Studio: the labelling config, tasks that carry our masks as a
prediction, the export parsed back into `Edit`s, and a small REST client.

The round trip keys every model mask by its annotation id:
- `record_to_task` puts each annotation of an SA-1B record in the task's prediction as a brush
  region with id `m<annotation id>`. Label Studio keeps region ids when a person starts from a
  prediction, so the annotation that comes back says which model mask they kept, repainted or deleted.
- `parse_export` reads a snapshot export (full prediction bodies) and, per task, the latest
  submitted annotation against the prediction it started from:
  - region `m<k>` with the same mask: nothing; a different mask: `replace` k; erased: `delete` k;
  - a model region missing from the annotation: `delete` k;
  - any other brush region: `add` with its mask;
  - rectangles and keypoints: `add` with a `Prompt` for the engine's model to segment.
  - smart clicks and drags of ASSISTED_LABEL_CONFIG: nothing (the ML backend's masks they produced
    are brush regions of their own, read as above).

Prompt convention (also shown to the person by the config's header): a rectangle is a box
prompt; a keypoint labelled "negative" or "background" is a negative click, any other label a
positive one. Regions joined by relations form one object's prompt (a box plus clicks, or several
clicks); a keypoint without relations is a prompt on its own, so a lone negative click is an error.

Everything from the server is validated (it stores whatever a client sends): an annotation with
anything unusable is reported in `ParsedExport.skipped` with the task and region named, and none
of its edits are applied.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from sam_train.data import rle as coco_rle
from sam_train.data.convert import coco_mask
from sam_train.data.sa1b import validate_record
from sam_train.engine import brush_rle
from sam_train.engine.records import NEGATIVE_LABELS, Edit, Ingested, Prompt, Provenance

# Tag names of LABEL_CONFIG: results name them in from_name / to_name.
IMAGE, MASK, BOX, POINT = "image", "mask", "box", "point"
MASK_LABEL = "object"
POSITIVE, NEGATIVE = "positive", "negative"
REGION_PREFIX = "m"  # model region ids are REGION_PREFIX + annotation id
RESULT_TYPES = {MASK: "brushlabels", BOX: "rectanglelabels", POINT: "keypointlabels"}

LABEL_CONFIG = f"""<View>
  <Header value="Keep, repaint or delete the model's masks; paint missing objects. Or prompt the model with
    a box and/or points ({POSITIVE} = on the object, {NEGATIVE} = not on it): relate the points of one
    object to its box or first point."/>
  <Image name="{IMAGE}" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="{MASK}" toName="{IMAGE}">
    <Label value="{MASK_LABEL}" background="#1f77b4"/>
  </BrushLabels>
  <RectangleLabels name="{BOX}" toName="{IMAGE}" canRotate="false">
    <Label value="{MASK_LABEL}" background="#ff7f0e"/>
  </RectangleLabels>
  <KeyPointLabels name="{POINT}" toName="{IMAGE}">
    <Label value="{POSITIVE}" background="#2ca02c"/>
    <Label value="{NEGATIVE}" background="#d62728"/>
  </KeyPointLabels>
</View>
"""


# The assisted-manual config (SAM's first stage): no model masks to review; people click objects with
# smart tools and our ML backend (`sam-train serve`) answers each click with a mask. The clicks and
# drags are the tool's input, not labels: parse_export reads only the masks they produced.
CLICK, DRAG = "click", "drag"
ASSISTED_LABEL_CONFIG = f"""<View>
  <Header value="Turn on auto-annotation. Click an object (Alt-click: not this object) or drag a box around it:
    the model answers with its mask. Refine with more clicks, then keep the mask. Paint what it cannot find."/>
  <Image name="{IMAGE}" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="{MASK}" toName="{IMAGE}">
    <Label value="{MASK_LABEL}" background="#1f77b4"/>
  </BrushLabels>
  <KeyPointLabels name="{CLICK}" toName="{IMAGE}" smart="true" smartOnly="true">
    <Label value="{MASK_LABEL}" smart="true" background="#2ca02c"/>
  </KeyPointLabels>
  <RectangleLabels name="{DRAG}" toName="{IMAGE}" smart="true" smartOnly="true" canRotate="false">
    <Label value="{MASK_LABEL}" background="#ff7f0e"/>
  </RectangleLabels>
</View>
"""


def model_version(round: int) -> str:
    """The prediction's model_version: which engine round's model made the masks a person sees."""
    return f"sam-train-round-{round}"


# ----------------------------------------------------------------------------------------------
# Results: what a prediction holds and what a person submits.


def brush_result(mask: np.ndarray, region_id: str, label: str = MASK_LABEL, score: float | None = None) -> dict:
    """A brush region for an H x W bool mask, in Label Studio's native RLE."""
    height, width = mask.shape
    result = {
        "id": region_id, "type": RESULT_TYPES[MASK], "from_name": MASK, "to_name": IMAGE,
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"format": "rle", "rle": brush_rle.encode(mask), "brushlabels": [label]},
    }
    if score is not None:
        result["score"] = float(score)
    return result


def box_result(box: Sequence[float], width: int, height: int, region_id: str, label: str = MASK_LABEL) -> dict:
    """A rectangle for an XYXY pixel box on a width x height image (Label Studio stores percentages)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return {
        "id": region_id, "type": RESULT_TYPES[BOX], "from_name": BOX, "to_name": IMAGE,
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                  "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]},
    }


def point_result(point: Sequence[float], positive: bool, width: int, height: int, region_id: str) -> dict:
    """A keypoint click at (x, y) pixels, labelled positive or negative."""
    x, y = (float(v) for v in point)
    return {
        "id": region_id, "type": RESULT_TYPES[POINT], "from_name": POINT, "to_name": IMAGE,
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 0.5,
                  "keypointlabels": [POSITIVE if positive else NEGATIVE]},
    }


def click_result(point: Sequence[float], positive: bool, width: int, height: int, region_id: str) -> dict:
    """A smart click of ASSISTED_LABEL_CONFIG at (x, y) pixels, as the editor sends it to an ML backend
    (Alt-click makes it negative: `is_positive` false)."""
    x, y = (float(v) for v in point)
    return {
        "id": region_id, "type": RESULT_TYPES[POINT], "from_name": CLICK, "to_name": IMAGE,
        "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": bool(positive),
        "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 0.5, "keypointlabels": [MASK_LABEL]},
    }


def relation_result(from_id: str, to_id: str) -> dict:
    """A relation joining two prompt regions into one object's prompt."""
    return {"type": "relation", "from_id": from_id, "to_id": to_id, "direction": "right", "labels": []}


def record_to_task(record: dict, image_url: str, key: str, round: int) -> dict:
    """An SA-1B record -> a Label Studio task whose prediction shows every mask as brush region `m<id>`.

    `image_url` is what Label Studio loads (a `/data/local-files/?d=...` path, an http URL or a
    data: URI); the task's data also keeps the sample key, the round and the image size, which
    `parse_export` checks every returned region against.
    """
    validate_record(record, check_annotations=False)
    height, width = record["image"]["height"], record["image"]["width"]
    results, seen = [], set()
    for i, ann in enumerate(record["annotations"]):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not isinstance(ann_id, int) or isinstance(ann_id, bool) or ann_id in seen:
            raise ValueError(f"{key}: annotation {i} needs an integer id unique in its image, got {ann_id!r}")
        seen.add(ann_id)
        score = ann.get("predicted_iou")
        if not isinstance(score, Real):
            raise ValueError(f"{key}: annotation {ann_id} has no numeric predicted_iou")
        try:
            mask = coco_mask(ann.get("segmentation"), height, width)
        except ValueError as exc:
            raise ValueError(f"{key}: annotation {ann_id}: {exc}") from exc
        results.append(brush_result(mask, f"{REGION_PREFIX}{ann_id}", score=score))
    scores = [r["score"] for r in results]
    return {
        "data": {"image": image_url, "key": key, "round": int(round), "width": width, "height": height},
        "predictions": [{
            "model_version": model_version(round),
            "score": float(np.mean(scores)) if scores else 0.0,
            "result": results,
        }],
    }


# ----------------------------------------------------------------------------------------------
# Export -> edits.


@dataclass
class ParsedExport(Ingested):
    """What an export says: the edits, and every task or annotation that did not become edits.

    `skipped` is (item, reason) for each task whose latest annotation could not be used (none of
    its edits are in `edits`).
    """

    unannotated: list[str] = field(default_factory=list)  # task ids with no submitted, non-cancelled annotation
    superseded: list[tuple[str, int]] = field(default_factory=list)  # (task id, annotation id) a later one replaced
    drafts: list[str] = field(default_factory=list)  # task ids with unsubmitted drafts: submit them in Label Studio


def parse_export(tasks: list[dict], round: int) -> ParsedExport:
    """Label Studio's JSON snapshot export -> the engine's edits, each with human provenance for `round`."""
    if not isinstance(tasks, list):
        raise ValueError(f"a Label Studio JSON export is a list of tasks, got {type(tasks).__name__}")
    out = ParsedExport()
    for i, task in enumerate(tasks):
        task_id = str(task.get("id", f"#{i}")) if isinstance(task, dict) else f"#{i}"
        item = f"task {task_id}"
        try:
            if not isinstance(task, dict):
                raise ValueError("not an object")
            key, width, height = _data(task)
            item = f"task {task_id} (image {key})"
            if task.get("drafts"):
                out.drafts.append(task_id)
            annotation, older = _latest_annotation(task)
            if annotation is None:
                out.unannotated.append(task_id)
                continue
            out.edits.extend(_annotation_edits(task, task_id, annotation, round, key, width, height))
            out.superseded.extend((task_id, a["id"]) for a in older)
        except ValueError as exc:
            out.skipped.append((item, str(exc)))
    return out


def _data(task: dict) -> tuple[str, int, int]:
    """The sample key and image size record_to_task put in the task's data."""
    data = task.get("data")
    if not isinstance(data, dict):
        raise ValueError("no data object")
    key, width, height = data.get("key"), data.get("width"), data.get("height")
    if not isinstance(key, str) or not key:
        raise ValueError("data has no sample key (was the task made by record_to_task?)")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise ValueError(f"data needs the image's positive integer width and height, got {width!r} x {height!r}")
    return key, width, height


def _latest_annotation(task: dict) -> tuple[dict | None, list[dict]]:
    """The most recent submitted, non-cancelled annotation, and the earlier ones it supersedes."""
    annotations = task.get("annotations", [])
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise ValueError("annotations are not a list of objects")
    submitted = [a for a in annotations if not a.get("was_cancelled")]
    for a in submitted:
        if not isinstance(a.get("id"), int) or isinstance(a.get("id"), bool):
            raise ValueError(f"an annotation has no integer id ({a.get('id')!r})")
    ordered = sorted(submitted, key=lambda a: (_timestamp(a), a["id"]))
    return (ordered[-1], ordered[:-1]) if ordered else (None, [])


def _timestamp(annotation: dict) -> datetime:
    """When the annotation was last saved (zone-less times are UTC)."""
    raw = annotation.get("updated_at") or annotation.get("created_at")
    try:
        stamp = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"annotation {annotation.get('id')} has no valid updated_at/created_at ({raw!r})") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _annotator(annotation: dict) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def _annotation_edits(
    task: dict, task_id: str, annotation: dict, round: int, key: str, width: int, height: int
) -> list[Edit]:
    """All edits of one annotation, or ValueError naming the annotation and region that is unusable."""
    where = f"annotation {annotation['id']}"
    results = annotation.get("result")
    if not isinstance(results, list):
        raise ValueError(f"{where}: result is not a list")
    predicted = _predicted_masks(task, annotation, width, height)
    provenance = Provenance(
        source="human", round=int(round), annotator=_annotator(annotation), task_id=task_id,
        time=_timestamp(annotation).astimezone(timezone.utc).replace(microsecond=0).isoformat(),
    )

    brushes, prompts, relations, seen = [], {}, [], set()
    for result in results:
        if not isinstance(result, dict):
            raise ValueError(f"{where}: a result is not an object")
        if result.get("type") == "relation":
            relations.append(result)
            continue
        if result.get("from_name") in (CLICK, DRAG):
            continue  # a smart tool's input: the mask it produced is a brush region of its own
        region = result.get("id")
        if not isinstance(region, str) or not region or region in seen:
            raise ValueError(f"{where}: a {result.get('type')} result has a missing or repeated id {region!r}")
        seen.add(region)
        here = f"{where}, region {region}"
        tag = _check_result(result, here, width, height)
        if tag == MASK:
            brushes.append((region, _brush_mask(result, here, width, height), _label(result, MASK, here)))
        else:
            prompts[region] = (tag, result)

    edits, kept = [], set()
    for region, mask, label in brushes:
        target = _model_id(region)
        extra = {"region_id": region, "annotation_id": annotation["id"]}
        if target in predicted:
            kept.add(target)
            if not mask.any():  # painted away entirely: the person removed the object
                edits.append(Edit(key, "delete", provenance, target=target, label=label, extra=extra))
            elif not np.array_equal(mask, predicted[target]):
                rle = coco_rle.encode(mask)
                edits.append(Edit(key, "replace", provenance, rle=rle, target=target, label=label, extra=extra))
        elif mask.any():  # an empty new region holds nothing to add
            edits.append(Edit(key, "add", provenance, rle=coco_rle.encode(mask), label=label, extra=extra))
    for target in sorted(set(predicted) - kept):
        extra = {"region_id": f"{REGION_PREFIX}{target}", "annotation_id": annotation["id"]}
        edits.append(Edit(key, "delete", provenance, target=target, extra=extra))
    for group in _prompt_groups(prompts, relations, where):
        prompt, label = _prompt(group, prompts, where, width, height)
        edits.append(Edit(key, "add", provenance, prompt=prompt, label=label,
                          extra={"region_ids": group, "annotation_id": annotation["id"]}))
    return edits


def _predicted_masks(task: dict, annotation: dict, width: int, height: int) -> dict[int, np.ndarray]:
    """The model masks the annotation started from: its parent prediction, else the task's latest."""
    predictions = task.get("predictions", [])
    if not isinstance(predictions, list):
        raise ValueError("predictions are not a list")
    if any(not isinstance(p, dict) for p in predictions):
        raise ValueError(
            "predictions are ids, not bodies: export a snapshot with "
            "serialization_options.predictions.only_id = false (LabelStudio.export does)"
        )
    parent = annotation.get("parent_prediction")
    if parent is not None:
        chosen = [p for p in predictions if p.get("id") == parent]
        if not chosen:
            raise ValueError(f"annotation {annotation['id']} started from prediction {parent}, which the export lacks")
    else:
        chosen = sorted(predictions, key=lambda p: p.get("id") if isinstance(p.get("id"), int) else -1)[-1:]
    masks = {}
    for prediction in chosen:
        results = prediction.get("result")
        if not isinstance(results, list):
            raise ValueError(f"prediction {prediction.get('id')} has no result list")
        for result in results:
            target = _model_id(result.get("id")) if isinstance(result, dict) else None
            if target is None or result.get("type") != RESULT_TYPES[MASK]:
                continue  # not one of our model masks (e.g. another backend's pre-labels): nothing to compare
            where = f"prediction {prediction.get('id')}, region {result['id']}"
            _check_result(result, where, width, height)
            masks[target] = _brush_mask(result, where, width, height)
    return masks


def _model_id(region: Any) -> int | None:
    """k for a model region id `m<k>`, else None."""
    if isinstance(region, str) and region.startswith(REGION_PREFIX) and region[len(REGION_PREFIX):].isdigit():
        return int(region[len(REGION_PREFIX):])
    return None


def _check_result(result: dict, where: str, width: int, height: int) -> str:
    """The config tag a result belongs to, after checking its names, type and image size."""
    tag = result.get("from_name")
    if tag not in RESULT_TYPES:
        tags = ", ".join(RESULT_TYPES)
        raise ValueError(f"{where}: from_name {tag!r} is not a tag of the labelling config ({tags})")
    if result.get("type") != RESULT_TYPES[tag]:
        raise ValueError(f"{where}: a {tag!r} result has type {result.get('type')!r}, not {RESULT_TYPES[tag]!r}")
    if result.get("to_name") != IMAGE:
        raise ValueError(f"{where}: to_name {result.get('to_name')!r} is not {IMAGE!r}")
    size = (result.get("original_width"), result.get("original_height"))
    if size != (width, height):
        raise ValueError(
            f"{where}: drawn on a {size[0]} x {size[1]} image (width x height), the task's is {width} x {height}"
        )
    if not isinstance(result.get("value"), dict):
        raise ValueError(f"{where}: no value object")
    return tag


def _label(result: dict, tag: str, where: str) -> str:
    """The region's one class label (a region with none or several is ambiguous)."""
    labels = result["value"].get(RESULT_TYPES[tag])
    if not (isinstance(labels, list) and len(labels) == 1 and isinstance(labels[0], str) and labels[0]):
        raise ValueError(f"{where}: needs exactly one {RESULT_TYPES[tag]} label, got {labels!r}")
    return labels[0]


def _brush_mask(result: dict, where: str, width: int, height: int) -> np.ndarray:
    """A brush region's mask, or ValueError naming the region and what is wrong with its RLE."""
    value = result["value"]
    if value.get("format") != "rle":
        raise ValueError(f"{where}: brush format {value.get('format')!r} is not 'rle'")
    try:
        return brush_rle.decode(value.get("rle"), height, width)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _prompt_groups(prompts: dict[str, tuple[str, dict]], relations: list[dict], where: str) -> list[list[str]]:
    """Prompt regions joined by relations (connected components), in the annotation's order."""
    parent = {region: region for region in prompts}

    def root(region: str) -> str:
        while parent[region] != region:
            parent[region] = parent[parent[region]]
            region = parent[region]
        return region

    for relation in relations:
        ends = (relation.get("from_id"), relation.get("to_id"))
        if not all(end in prompts for end in ends):
            raise ValueError(
                f"{where}: relation {ends[0]!r} -> {ends[1]!r} joins something other than boxes and points"
            )
        parent[root(ends[0])] = root(ends[1])
    groups: dict[str, list[str]] = {}
    for region in prompts:
        groups.setdefault(root(region), []).append(region)
    return list(groups.values())


def _prompt(
    group: list[str], prompts: dict[str, tuple[str, dict]], where: str, width: int, height: int
) -> tuple[Prompt, str | None]:
    """One object's prompt from its rectangle and keypoints, in original-image pixels."""
    box, label, points, labels = None, None, [], []
    for region in group:
        tag, result = prompts[region]
        here = f"{where}, region {region}"
        value = result["value"]
        if tag == BOX:
            if box is not None:
                raise ValueError(f"{where}: regions {', '.join(group)} are related into one prompt with two boxes")
            box = rectangle_box(value, here, width, height)
            label = _label(result, BOX, here)
        else:
            points.append(keypoint_xy(value, here, width, height))
            labels.append(0 if _label(result, POINT, here).lower() in NEGATIVE_LABELS else 1)
    if box is None and 1 not in labels:
        raise ValueError(
            f"{where}, region {group[0]}: negative points alone are no prompt; "
            "relate them to the box or positive point they refine"
        )
    return Prompt(box=box, points=tuple(points), labels=tuple(labels)), label


def rectangle_box(value: dict, where: str, width: int, height: int) -> tuple[float, float, float, float]:
    """A rectangle region's value (percent of the image) -> XYXY pixels; ValueError naming `where` if unusable."""
    x, y, w, h = (_percent(value, name, where) for name in ("x", "y", "width", "height"))
    if value.get("rotation", 0) != 0:
        raise ValueError(f"{where}: a rotated rectangle ({value.get('rotation')} deg) is not a box prompt")
    if w <= 0 or h <= 0 or x + w > 100 + 1e-6 or y + h > 100 + 1e-6:
        raise ValueError(f"{where}: rectangle {x}, {y}, {w} x {h} (percent) is empty or leaves the image")
    return x * width / 100, y * height / 100, (x + w) * width / 100, (y + h) * height / 100


def keypoint_xy(value: dict, where: str, width: int, height: int) -> tuple[float, float]:
    """A keypoint region's value (percent of the image) -> (x, y) pixels."""
    return _percent(value, "x", where) * width / 100, _percent(value, "y", where) * height / 100


def _percent(value: dict, name: str, where: str) -> float:
    number = value.get(name)
    if not isinstance(number, Real) or isinstance(number, bool) or not 0 <= number <= 100:
        raise ValueError(f"{where}: {name} must be a percentage of the image (0-100), got {number!r}")
    return float(number)


# ----------------------------------------------------------------------------------------------
# REST client.


class LabelStudioError(RuntimeError):
    """A Label Studio API call failed; the message has the method, path, HTTP status and body."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, None when the server did not answer


def is_personal_access_token(token: str) -> bool:
    """Whether `token` is a personal access token (a JWT, what Label Studio's Account page hands out)
    rather than a legacy API token."""
    return token.startswith("eyJ") and token.count(".") == 2


class LabelStudio:
    """The handful of Label Studio API calls the engine needs, over stdlib urllib.

    `token` is either kind Label Studio 1.23 gives a user: a legacy API token, sent as `Token <t>`
    (accepted only where the organisation enables legacy tokens), or a personal access token, a
    refresh JWT exchanged at /api/token/refresh/ for a short-lived access token sent as `Bearer <a>`
    and exchanged again when that expires.
    """

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._access: str | None = None  # the current access token of a personal access token

    def authorization(self, renew: bool = False) -> str:
        """The Authorization header for `token` (`renew`: a fresh access token, the last one expired)."""
        if not is_personal_access_token(self.token):
            return f"Token {self.token}"
        if self._access is None or renew:
            reply = self._send("POST", "/api/token/refresh/", {"refresh": self.token}, None, False, None)
            self._access = reply["access"]
        return f"Bearer {self._access}"

    def request(self, method: str, path: str, body: Any = None, query: dict | None = None, raw: bool = False) -> Any:
        """One API call; returns the decoded JSON (or bytes with raw), raises LabelStudioError with status and body."""
        try:
            return self._send(method, path, body, query, raw, self.authorization())
        except LabelStudioError as exc:
            if exc.status != 401 or not is_personal_access_token(self.token):
                raise
            return self._send(method, path, body, query, raw, self.authorization(renew=True))  # access expired

    def _send(self, method: str, path: str, body: Any, query: dict | None, raw: bool, authorization: str | None) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:2000].decode(errors="replace")
            raise LabelStudioError(f"{method} {path} -> HTTP {exc.code}: {detail}", exc.code) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise LabelStudioError(f"{method} {path}: Label Studio at {self.url} did not answer ({exc})") from None
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def health(self) -> bool:
        """Whether the server is up (no auth needed): what a start-up wait polls."""
        try:
            return (self.request("GET", "/health") or {}).get("status") == "UP"
        except LabelStudioError:
            return False

    def create_project(self, title: str, label_config: str = LABEL_CONFIG, **settings: Any) -> dict:
        """A project with our labelling config; predictions pre-fill what the person sees."""
        body = {"title": title, "label_config": label_config, "show_collab_predictions": True, **settings}
        return self.request("POST", "/api/projects", body)

    def connect_local_files(self, project_id: int, path: str | Path, title: str = "images") -> dict:
        """Let the project serve images from `path`, a folder under the server's local-files document root."""
        body = {"project": project_id, "path": str(path), "title": title, "use_blob_urls": True}
        return self.request("POST", "/api/storages/localfiles", body)

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Import tasks (with their predictions); returns the new task ids in order."""
        reply = self.request("POST", f"/api/projects/{project_id}/import", tasks, query={"return_task_ids": "true"})
        ids = reply.get("task_ids") if isinstance(reply, dict) else None
        if not isinstance(ids, list) or len(ids) != len(tasks):
            raise LabelStudioError(f"import into project {project_id} returned {reply!r}, not {len(tasks)} task ids")
        return ids

    def prelabel_with(self, project_id: int, model_version: str) -> dict:
        """Pre-fill the editor with the predictions of `model_version`. Label Studio shows a person only the
        predictions of the project's model version, which it sets once, at the first import with predictions."""
        return self.request("PATCH", f"/api/projects/{project_id}", {"model_version": model_version})

    def annotate(self, task_id: int, result: list[dict], lead_time: float = 1.0, was_cancelled: bool = False,
                 parent_prediction: int | None = None) -> dict:
        """Submit an annotation as a person would from the editor (tests and the simulated annotator)."""
        body = {"result": result, "was_cancelled": was_cancelled, "lead_time": lead_time}
        if parent_prediction is not None:
            body["parent_prediction"] = parent_prediction
        return self.request("POST", f"/api/tasks/{task_id}/annotations/", body)

    def connect_ml_backend(self, project_id: int, url: str, title: str = "sam-train") -> dict:
        """Register an interactive ML backend (`sam-train serve`) with a project; Label Studio checks
        /health, calls /setup and adds the backend's /webhook to the project."""
        body = {"project": project_id, "url": url, "title": title, "is_interactive": True}
        backend = self.request("POST", "/api/ml", body)
        if backend.get("state") != "CO":  # connected
            raise LabelStudioError(f"ML backend {url} did not connect to project {project_id}:"
                                   f" state {backend.get('state')!r}, {backend.get('error_message') or 'no message'}")
        return backend

    def interactive_annotate(self, backend_id: int, task_id: int, context: dict) -> dict:
        """What the editor asks when a person places a smart keypoint or rectangle: the backend's prediction
        (its result regions) for `context` = {"result": [the regions placed]}; LabelStudioError if it failed."""
        reply = self.request("POST", f"/api/ml/{backend_id}/interactive-annotating", {"task": task_id, "context": context})
        if not isinstance(reply, dict) or reply.get("errors") or not isinstance(reply.get("data"), dict):
            raise LabelStudioError(f"interactive annotation of task {task_id} by ML backend {backend_id}: {reply!r}")
        return reply["data"]

    def tasks(self, project_id: int, page_size: int = 100) -> list[dict]:
        """Every task of a project, page by page."""
        out, page = [], 1
        while True:
            query = {"project": project_id, "page": page, "page_size": page_size}
            reply = self.request("GET", "/api/tasks", query=query)
            batch = reply.get("tasks", []) if isinstance(reply, dict) else reply
            out.extend(batch)
            total = reply.get("total") if isinstance(reply, dict) else None
            if not batch or total is None or len(out) >= total:
                return out
            page += 1

    def export(self, project_id: int, timeout: float = 600.0, poll: float = 0.5) -> list[dict]:
        """A snapshot export with full prediction bodies and all annotations, cancelled too: parse_export's input."""
        body = {
            "title": "sam-train",
            "serialization_options": {"predictions": {"only_id": False}, "drafts": {"only_id": False},
                                      "annotations__completed_by": {"only_id": False}},  # e-mails, not user ids
            "annotation_filter_options": {"usual": True, "ground_truth": True, "skipped": True},
        }
        snapshot = self.request("POST", f"/api/projects/{project_id}/exports/", body)
        path = f"/api/projects/{project_id}/exports/{snapshot['id']}"
        deadline = time.monotonic() + timeout
        name = f"snapshot export {snapshot['id']} of project {project_id}"
        while snapshot.get("status") != "completed":
            if snapshot.get("status") == "failed":
                raise LabelStudioError(f"{name} failed: {snapshot!r}")
            if time.monotonic() > deadline:
                raise LabelStudioError(f"{name} not done after {timeout:.0f} s")
            time.sleep(poll)
            snapshot = self.request("GET", path)
        return json.loads(self.request("GET", f"{path}/download", query={"exportType": "JSON"}, raw=True))


def local_file_url(path: str | Path, document_root: str | Path) -> str:
    """The task URL under which Label Studio serves a local image (needs connect_local_files on a folder above it)."""
    relative = Path(path).resolve().relative_to(Path(document_root).resolve())
    return "/data/local-files/?" + urllib.parse.urlencode({"d": relative.as_posix()})
