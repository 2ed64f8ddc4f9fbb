"""Label Studio tasks and exports without a server: record_to_task, parse_export and their validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from sam_train.data import rle as coco_rle
from sam_train.data.sa1b import make_annotation, make_record
from sam_train.engine import brush_rle
from sam_train.engine import labelstudio as ls
from sam_train.engine.records import Prompt, Provenance

H, W = 24, 32


def box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


MASKS = {1: box_mask(2, 10, 3, 12), 2: box_mask(12, 20, 15, 30), 3: box_mask(1, 4, 20, 31)}


def record() -> dict:
    return make_record(7, "a.jpg", H, W, [make_annotation(m, k, predicted_iou=0.5 + k / 10) for k, m in MASKS.items()])


def exported(annotations: list[dict], task_id: int = 5, prediction_id: int = 40) -> dict:
    """What a snapshot export holds for the task record_to_task made, with these annotations."""
    task = ls.record_to_task(record(), "/data/local-files/?d=a.jpg", "a", 2)
    task["id"] = task_id
    task["predictions"][0]["id"] = prediction_id
    task["annotations"] = annotations
    task["drafts"] = []
    return task


def annotation(result: list[dict], ann_id: int = 1, updated: str = "2026-11-25T10:00:00.123456Z", **fields) -> dict:
    return {"id": ann_id, "completed_by": {"id": 3, "email": "ann@example.com"}, "result": result,
            "was_cancelled": False, "created_at": "2026-11-25T09:00:00Z", "updated_at": updated,
            "parent_prediction": None, **fields}


def predicted() -> list[dict]:
    """The prediction's regions, as a person who accepts them all submits them."""
    return copy.deepcopy(exported([])["predictions"][0]["result"])


def test_record_to_task_carries_every_mask_as_region_m_id() -> None:
    task = ls.record_to_task(record(), "/data/local-files/?d=a.jpg", "a", 2)
    assert task["data"] == {"image": "/data/local-files/?d=a.jpg", "key": "a", "round": 2, "width": W, "height": H}
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == "sam-train-round-2"
    assert prediction["score"] == pytest.approx(np.mean([0.6, 0.7, 0.8]))
    assert [r["id"] for r in prediction["result"]] == ["m1", "m2", "m3"]
    for result, (k, mask) in zip(prediction["result"], MASKS.items()):
        assert (result["from_name"], result["to_name"], result["type"]) == ("mask", "image", "brushlabels")
        assert (result["original_width"], result["original_height"]) == (W, H)
        assert result["score"] == pytest.approx(0.5 + k / 10)
        assert np.array_equal(brush_rle.decode(result["value"]["rle"], H, W), mask)


def test_record_to_task_rejects_bad_records() -> None:
    bad = record()
    bad["annotations"][1]["id"] = 1
    with pytest.raises(ValueError, match="annotation 1 needs an integer id unique"):
        ls.record_to_task(bad, "u", "a", 0)
    bad = record()
    bad["annotations"][2]["segmentation"] = coco_rle.encode(np.zeros((H + 1, W), bool))
    with pytest.raises(ValueError, match="a: annotation 3: bad RLE: RLE size 25x32 does not match"):
        ls.record_to_task(bad, "u", "a", 0)


def test_accepting_the_prediction_changes_nothing() -> None:
    parsed = ls.parse_export([exported([annotation(predicted())])], round=3)
    assert parsed.edits == [] and parsed.skipped == [] and parsed.unannotated == []


def test_replace_delete_add_and_prompts() -> None:
    result = predicted()
    corrected = MASKS[1] | box_mask(10, 12, 3, 12)
    result[0] = ls.brush_result(corrected, "m1")
    result[2] = ls.brush_result(np.zeros((H, W), bool), "m3")  # painted away
    del result[1]  # m2 deleted
    ring = box_mask(5, 20, 5, 20) & ~box_mask(9, 16, 9, 16)
    result += [
        ls.brush_result(ring, "Xy12abc"),
        ls.brush_result(np.zeros((H, W), bool), "empty"),  # nothing drawn: nothing to add
        ls.box_result((4, 6, 20, 18), W, H, "b1"),
        ls.point_result((10, 12), False, W, H, "p-neg"),
        ls.relation_result("p-neg", "b1"),
        ls.point_result((25.5, 3), True, W, H, "p-pos"),
    ]
    parsed = ls.parse_export([exported([annotation(result)])], round=3)
    assert parsed.skipped == []
    provenance = Provenance("human", 3, "ann@example.com", "5", "2026-11-25T10:00:00+00:00")
    assert all(edit.provenance == provenance and edit.image == "a" for edit in parsed.edits)
    summary = [(e.action, e.target, e.extra.get("region_id"), e.extra.get("region_ids")) for e in parsed.edits]
    assert summary == [
        ("replace", 1, "m1", None), ("delete", 3, "m3", None), ("add", None, "Xy12abc", None),
        ("delete", 2, "m2", None), ("add", None, None, ["b1", "p-neg"]), ("add", None, None, ["p-pos"]),
    ]
    replace, _, add, _, boxed, clicked = parsed.edits
    assert replace.rle == coco_rle.encode(corrected) and add.rle == coco_rle.encode(ring)
    assert boxed.prompt.box == pytest.approx((4, 6, 20, 18)) and boxed.label == "object"
    assert np.allclose(boxed.prompt.points, [(10, 12)]) and boxed.prompt.labels == (0,)
    assert clicked.prompt == Prompt(points=clicked.prompt.points, labels=(1,))
    assert np.allclose(clicked.prompt.points, [(25.5, 3)])


def test_latest_submitted_annotation_wins() -> None:
    deleted_all = annotation([], ann_id=1, updated="2026-11-25T08:00:00Z")
    kept_all = annotation(predicted(), ann_id=2, updated="2026-11-25T09:00:00Z")
    cancelled = annotation([], ann_id=3, updated="2026-11-25T11:00:00Z", was_cancelled=True)
    parsed = ls.parse_export([exported([kept_all, cancelled, deleted_all])], round=1)
    assert parsed.edits == [] and parsed.superseded == [("5", 1)]
    parsed = ls.parse_export([exported([cancelled]), exported([], task_id=6)], round=1)
    assert parsed.edits == [] and parsed.unannotated == ["5", "6"]


def test_parent_prediction_is_the_baseline() -> None:
    task = exported([annotation(predicted(), parent_prediction=40)])
    newer = copy.deepcopy(task["predictions"][0])
    newer["id"] = 41
    newer["result"] = newer["result"][:1]  # a later model round that kept only m1
    task["predictions"].append(newer)
    assert ls.parse_export([task], round=1).edits == []
    del task["annotations"][0]["parent_prediction"]  # without it, the latest prediction is the baseline
    added = ls.parse_export([task], round=1).edits
    assert [(e.action, e.extra["region_id"]) for e in added] == [("add", "m2"), ("add", "m3")]


def test_annotator_id_when_the_export_has_no_email() -> None:
    parsed = ls.parse_export([exported([annotation([], completed_by=7)])], round=0)
    assert {e.provenance.annotator for e in parsed.edits} == {"7"}
    assert [e.action for e in parsed.edits] == ["delete"] * 3


def garbage_cases() -> list[tuple[list[dict], str]]:
    """(annotation result, what the report must say) for things the server stores without complaint."""
    cut = predicted()
    cut[0]["value"]["rle"] = cut[0]["value"]["rle"][:-6]
    resized = predicted()
    resized[1] = ls.brush_result(np.zeros((H, W + 1), bool), "m2")
    wrong_tag = predicted() + [{**ls.box_result((1, 1, 5, 5), W, H, "b"), "from_name": "bbox"}]
    rotated = [{**ls.box_result((1, 1, 5, 5), W, H, "b"), "value": {**ls.box_result((1, 1, 5, 5), W, H, "b")["value"],
                                                                        "rotation": 30}}]
    return [
        (cut, "annotation 1, region m1: brush RLE stops after"),
        (resized, "region m2: drawn on a 33 x 24 image (width x height), the task's is 32 x 24"),
        (wrong_tag, "region b: from_name 'bbox' is not a tag"),
        ([{**predicted()[0], "type": "polygonlabels"}], "region m1: a 'mask' result has type 'polygonlabels'"),
        ([{"type": "textarea", "value": {"text": ["hi"]}}], "a textarea result has a missing or repeated id None"),
        ([predicted()[0], predicted()[0]], "repeated id 'm1'"),
        ([ls.point_result((3, 3), False, W, H, "n")], "region n: negative points alone are no prompt"),
        ([predicted()[0], ls.point_result((3, 3), True, W, H, "p"), ls.relation_result("p", "m1")],
         "relation 'p' -> 'm1' joins something other than boxes and points"),
        (rotated, "region b: a rotated rectangle (30 deg)"),
        ([ls.box_result((1, 1, 50, 5), W, H, "b")], "region b: width must be a percentage"),
        ([{**ls.point_result((3, 3), True, W, H, "p"), "value": {"x": 1, "y": 1, "keypointlabels": []}}],
         "region p: needs exactly one keypointlabels label"),
        ([{**predicted()[0], "value": {"format": "png", "rle": []}}], "brush format 'png' is not 'rle'"),
    ]


@pytest.mark.parametrize("result, reason", garbage_cases(), ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_unusable_annotation_is_reported_and_skipped_whole(result: list[dict], reason: str) -> None:
    good = exported([annotation([])], task_id=9)  # deletes all three: proves other tasks still apply
    parsed = ls.parse_export([exported([annotation(result)]), good], round=1)
    assert [item for item, _ in parsed.skipped] == ["task 5 (image a)"]
    assert reason in parsed.skipped[0][1]
    assert {e.provenance.task_id for e in parsed.edits} == {"9"}


def test_task_level_garbage_is_reported() -> None:
    quick_export = exported([annotation([])])
    quick_export["predictions"] = [40]
    no_key = exported([annotation([])])
    del no_key["data"]["key"]
    bad_time = exported([annotation([], updated="yesterday", created_at=None)])
    parsed = ls.parse_export([quick_export, no_key, bad_time, "nonsense"], round=1)
    assert parsed.edits == [] and len(parsed.skipped) == 4
    assert parsed.skipped[0][0] == "task 5 (image a)" and "predictions are ids, not bodies" in parsed.skipped[0][1]
    assert parsed.skipped[1][0] == "task 5" and "no sample key" in parsed.skipped[1][1]
    assert "no valid updated_at/created_at ('yesterday')" in parsed.skipped[2][1]
    assert parsed.skipped[3] == ("task #3", "not an object")


def test_local_file_url(tmp_path) -> None:
    image = tmp_path / "round 1" / "a+b.jpg"
    assert ls.local_file_url(image, tmp_path) == "/data/local-files/?d=round+1%2Fa%2Bb.jpg"
    with pytest.raises(ValueError):
        ls.local_file_url("/elsewhere/a.jpg", tmp_path)
