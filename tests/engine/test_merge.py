"""Applying people's edits to model masks: replacements, deletions, additions, prompts, and nothing lost silently."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam_train.data.rle import encode
from sam_train.data.sa1b import check_annotation, make_annotation, make_record
from sam_train.engine.merge import apply_edits
from sam_train.engine.records import ANN_ID_STRIDE, Edit, Prompt, Provenance

H, W = 40, 60
PERSON = Provenance("human", 2, annotator="ann@example.org", task_id="7", time="2026-11-25T12:00:00+00:00")


def box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


B = 3 * ANN_ID_STRIDE  # image 3's block of annotation ids


def model_record() -> dict:
    anns = [make_annotation(box_mask(0, 10, 0, 10), B), make_annotation(box_mask(20, 30, 20, 30), B + 1),
            make_annotation(box_mask(5, 15, 40, 50), B + 4)]
    for ann in anns:
        ann["provenance"] = Provenance("model", 1).as_json()
    return make_record(3, "img.jpg", H, W, anns)


def decode(ann: dict) -> np.ndarray:
    return mask_utils.decode({**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}).astype(bool)


def test_replace_delete_add_with_holes_and_provenance():
    donut = box_mask(10, 30, 5, 25)
    donut[15:25, 10:20] = False  # a hole that must survive ingestion
    edits = [
        Edit("img", "replace", PERSON, rle=encode(box_mask(0, 12, 0, 12)), target=B),
        Edit("img", "delete", PERSON, target=B + 1),
        Edit("img", "add", PERSON, rle=encode(donut)),
    ]
    record, report = apply_edits(model_record(), "img", edits)
    by_id = {a["id"] - B: a for a in record["annotations"]}
    assert (report.replaced, report.deleted, report.added, report.problems) == (1, 1, 1, [])
    assert set(by_id) == {4, 5, 6}, "0 replaced and 1 deleted go; new masks take ids past every id ever used"
    assert np.array_equal(decode(by_id[5]), box_mask(0, 12, 0, 12))
    assert by_id[5]["provenance"] == {**PERSON.as_json(), "corrects": B}
    assert np.array_equal(decode(by_id[6]), donut)
    assert by_id[4]["provenance"]["source"] == "model"
    # An image the model proposed nothing for (an assisted round): people's masks still get the image's ids.
    empty = {**model_record(), "annotations": []}
    record, _ = apply_edits(empty, "img", [Edit("img", "add", PERSON, rle=encode(donut))])
    assert [a["id"] for a in record["annotations"]] == [B]
    for ann in record["annotations"]:
        check_annotation(ann, H, W)  # bbox, area and RLE agree: a valid SA-1B annotation
    assert len(model_record()["annotations"]) == 3, "the input record is never modified"


def test_nothing_a_person_made_is_dropped_silently():
    edits = [
        Edit("img", "replace", PERSON, rle=encode(box_mask(0, 5, 0, 5)), target=9),  # mask 9 never existed
        Edit("img", "delete", PERSON, target=9),
        Edit("img", "add", PERSON, rle=encode(np.zeros((H, W), dtype=bool))),
        Edit("img", "add", PERSON, rle={"size": [W, H], "counts": encode(box_mask(0, 5, 0, 5))["counts"]}),
        Edit("img", "add", PERSON, prompt=Prompt(box=(0, 0, 10, 10))),  # no model to segment it
    ]
    record, report = apply_edits(model_record(), "img", edits)
    assert report.added == 1 and len(report.problems) == 5
    kept = [a for a in record["annotations"] if a["provenance"]["source"] == "human"]
    assert len(kept) == 1 and np.array_equal(decode(kept[0]), box_mask(0, 5, 0, 5)), "the orphan correction is kept"
    assert "mask 9 is gone" in report.problems[0] and "already gone" in report.problems[1]
    assert "empty mask" in report.problems[2] and "does not match the image" in report.problems[3]
    assert "needs a model" in report.problems[4]
    assert all(p.startswith("img edit ") for p in report.problems), "each problem names the image and the edit"


def test_prompts_are_segmented_by_the_given_model_and_wrong_images_refused():
    seen = []

    def segment(prompt: Prompt) -> tuple[np.ndarray, float]:
        seen.append(prompt)
        return box_mask(30, 40, 50, 60), 0.8

    prompt = Prompt(points=((55.0, 35.0),), labels=(1,))
    record, report = apply_edits(model_record(), "img", [Edit("img", "add", PERSON, prompt=prompt)], segment)
    new = record["annotations"][-1]
    assert seen == [prompt] and report.added == 1
    assert np.array_equal(decode(new), box_mask(30, 40, 50, 60)) and new["predicted_iou"] == pytest.approx(0.8)
    assert new["provenance"]["prompt"]["points"] == ((55.0, 35.0),)
    with pytest.raises(ValueError, match="for image 'other'"):
        apply_edits(model_record(), "img", [Edit("other", "delete", PERSON, target=0)])
