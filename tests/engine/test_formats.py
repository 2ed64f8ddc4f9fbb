"""Interchange formats: COCO export for CVAT, and COCO / CVAT XML / SA-1B corrections back as exact edits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam_train.data import rle, sa1b
from sam_train.engine.formats import ingest_sa1b
from sam_train.engine.formats_coco import CVAT_LABELS, export_coco, ingest_coco
from sam_train.engine.formats_cvat import decode_cvat_rle, ingest_cvat
from sam_train.engine.records import Edit, Prompt

H, W = 24, 32


def box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def donut(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A filled box with its inner part (one pixel in from every side) removed."""
    return box_mask(y0, y1, x0, x1) & ~box_mask(y0 + 1, y1 - 1, x0 + 1, x1 - 1)


def decoded(edit: Edit) -> np.ndarray:
    assert edit.rle["size"] == [H, W]
    return mask_utils.decode({"size": edit.rle["size"], "counts": edit.rle["counts"].encode()}).astype(bool)


def model_record(image_id: int, key: str, masks: dict[int, np.ndarray]) -> dict:
    annotations = []
    for ann_id, mask in masks.items():
        ann = sa1b.make_annotation(mask, ann_id, predicted_iou=0.9, stability_score=0.95)
        ann["provenance"] = {"source": "model", "round": 1, "annotator": None, "task_id": None, "time": None}
        annotations.append(ann)
    return sa1b.make_record(image_id, f"{key}.jpg", H, W, annotations)


@pytest.fixture
def records() -> dict[str, dict]:
    return {
        "img_a": model_record(7, "img_a", {101: box_mask(2, 10, 3, 12), 102: box_mask(12, 20, 5, 15), 103: box_mask(1, 6, 20, 30)}),
        "img_b": model_record(8, "img_b", {201: box_mask(0, H, 0, W // 2)}),
    }


def by_action(edits: list[Edit]) -> dict[str, list[Edit]]:
    out: dict[str, list[Edit]] = {"add": [], "replace": [], "delete": []}
    for edit in edits:
        out[edit.action].append(edit)
    return out


def cvat_rle(mask: np.ndarray) -> str:
    """CVAT's layout, written independently of the decoder: row-major runs over the box, background first."""
    flat = mask.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return ", ".join(map(str, ([0] if flat[0] else []) + runs))


# ---------------------------------------------------------------- COCO export

def test_export_coco_is_a_cvat_importable_coco_file(tmp_path: Path, records: dict) -> None:
    path = tmp_path / "out" / "export.json"
    ann_103 = records["img_a"]["annotations"][2]
    ann_103["segmentation"]["counts"] = rle.rle_counts(ann_103["segmentation"]).tolist()  # uncompressed in the record
    export_coco(records, path)
    data = json.loads(path.read_text())
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [("img_a.jpg", W, H), ("img_b.jpg", W, H)]
    assert [c["name"] for c in data["categories"]] == ["object"]
    anns = {a["id"]: a for a in data["annotations"]}
    assert sorted(anns) == [101, 102, 103, 201]
    for ann in anns.values():
        # datumaro (CVAT's COCO reader) requires iscrowd and reads any RLE as a mask; is_crowd=1
        # is what makes CVAT export it back as RLE.
        assert ann["iscrowd"] == 1 and ann["category_id"] == 1
        assert ann["attributes"]["sam_id"] == ann["id"] and ann["attributes"]["source"] == "auto"
        assert ann["attributes"]["round"] == 1 and ann["score"] == pytest.approx(0.9)
    coco = COCO(str(path))  # pycocotools reads it and decodes our masks exactly
    a_id = next(i["id"] for i in data["images"] if i["file_name"] == "img_a.jpg")
    assert np.array_equal(coco.annToMask(coco.anns[102]).astype(bool), box_mask(12, 20, 5, 15))
    assert isinstance(anns[103]["segmentation"]["counts"], str)  # compressed, whatever form the record held
    assert np.array_equal(coco.annToMask(coco.anns[103]).astype(bool), box_mask(1, 6, 20, 30))
    assert anns[102]["image_id"] == a_id and anns[102]["bbox"] == [5.0, 12.0, 10.0, 8.0] and anns[102]["area"] == 80
    assert not list(tmp_path.joinpath("out").glob(".*.tmp"))  # written atomically: no leftovers


def test_cvat_labels_declare_every_attribute_the_export_writes(tmp_path: Path, records: dict) -> None:
    export_coco(records, tmp_path / "e.json")
    written = {name for a in json.loads((tmp_path / "e.json").read_text())["annotations"] for name in a["attributes"]}
    written |= {"score", "is_crowd"}  # datumaro turns the score and iscrowd fields into attributes
    declared = {a["name"] for a in CVAT_LABELS[0]["attributes"]}
    assert written - {"source"} == declared  # CVAT consumes `source` itself, as the shape's origin


EMPTY = rle.encode(np.zeros((H, W), bool))
TOO_WIDE = rle.encode(np.ones((H, W + 1), bool))
TOO_TALL = rle.encode(np.ones((H + 1, W), bool))


@pytest.mark.parametrize(
    "key, index, change, message",
    [
        ("img_a", 0, {"segmentation": EMPTY}, "image 'img_a' annotation 101: empty mask"),
        ("img_b", 0, {"id": 102}, "annotation id 102 of image 'img_b' repeats one of image 'img_a'"),
        ("img_a", 1, {"segmentation": TOO_WIDE}, "image 'img_a' annotation 102: RLE size"),
    ],
)
def test_export_refuses_what_cannot_round_trip(tmp_path: Path, records: dict, key, index, change, message) -> None:
    records[key]["annotations"][index].update(change)
    with pytest.raises(ValueError, match=message):
        export_coco(records, tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()


# ---------------------------------------------------------------- COCO ingest

def corrected_export(tmp_path: Path, records: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """Our export as a person corrects it: 101 redrawn, 102 deleted, 103 kept, a donut and a two-part polygon added."""
    export_coco(records, tmp_path / "export.json")
    coco = json.loads((tmp_path / "export.json").read_text())
    a_id = next(i["id"] for i in coco["images"] if i["file_name"] == "img_a.jpg")
    expected = {"101": box_mask(3, 11, 3, 14), "donut": donut(12, 22, 18, 28), "polygon": box_mask(2, 8, 2, 10) | box_mask(20, 23, 0, 4)}
    anns = {a["id"]: a for a in coco["annotations"]}
    counts = rle.encode(expected["101"])
    anns[101]["segmentation"] = {"size": [H, W], "counts": rle.rle_counts(counts).tolist()}  # uncompressed RLE
    del anns[102]
    anns[9001] = {"id": 9001, "image_id": a_id, "category_id": 1, "iscrowd": 1, "segmentation": rle.encode(expected["donut"])}
    polygons = [[2, 2, 10, 2, 10, 8, 2, 8], [0, 20, 4, 20, 4, 23, 0, 23]]  # pixels [2:8, 2:10] and [20:23, 0:4]
    anns[9002] = {"id": 9002, "image_id": a_id, "category_id": 1, "iscrowd": 0, "segmentation": polygons}
    coco["annotations"] = list(anns.values())
    return coco, expected


def check_corrections(edits: list[Edit], expected: dict[str, np.ndarray], complete: bool, added_ids=(9001, 9002)) -> None:
    actions = by_action(edits)
    assert {e.image for e in edits} == {"img_a"}  # img_b came back unchanged: no edit at all
    (replaced,) = actions["replace"]
    assert replaced.target == 101 and np.array_equal(decoded(replaced), expected["101"])
    assert [e.target for e in actions["delete"]] == ([102] if complete else [])
    added = sorted(actions["add"], key=lambda e: e.extra["coco_id"])
    assert [e.extra["coco_id"] for e in added] == list(added_ids)
    assert np.array_equal(decoded(added[0]), expected["donut"])
    assert not decoded(added[0])[15, 22]  # the hole survived
    assert np.array_equal(decoded(added[1]), expected["polygon"])
    assert all(e.target is None and e.label == "object" for e in added)
    assert all(e.provenance.source == "human" and e.provenance.round == 2 for e in edits)


@pytest.mark.parametrize("complete", [True, False])
def test_coco_round_trip_gives_exactly_the_corrections(tmp_path: Path, records: dict, complete: bool) -> None:
    coco, expected = corrected_export(tmp_path, records)
    (tmp_path / "corrected.json").write_text(json.dumps(coco))
    result = ingest_coco(tmp_path / "corrected.json", records, complete=complete, round=2, annotator="carol")
    assert result.skipped == []
    check_corrections(result.edits, expected, complete)
    a_id = next(i["id"] for i in coco["images"] if i["file_name"] == "img_a.jpg")
    assert {(e.provenance.annotator, e.provenance.task_id) for e in result.edits} == {("carol", str(a_id))}
    assert all(e.provenance.time for e in result.edits)


def test_coco_from_cvat_links_masks_by_sam_id_not_by_renumbered_id(tmp_path: Path, records: dict) -> None:
    coco, expected = corrected_export(tmp_path, records)
    # CVAT's COCO export renumbers annotations 1..N, keeps declared attributes, writes its own info.
    for number, ann in enumerate(coco["annotations"], start=1):
        ann["extra_id"], ann["id"] = ann["id"], number
    coco["info"] = {"date_created": "2024-05-01 12:00:00+02:00"}
    (tmp_path / "cvat.json").write_text(json.dumps(coco))
    result = ingest_coco(tmp_path / "cvat.json", records, complete=True, round=2)
    renumbered = {a["extra_id"]: a["id"] for a in coco["annotations"]}
    check_corrections(result.edits, expected, complete=True, added_ids=(renumbered[9001], renumbered[9002]))
    assert {e.provenance.time for e in result.edits} == {"2024-05-01T10:00:00+00:00"}


def test_new_coco_mask_a_model_made_is_marked_model(tmp_path: Path, records: dict) -> None:
    coco, _ = corrected_export(tmp_path, records)
    new = next(a for a in coco["annotations"] if a["id"] == 9001)
    new["attributes"] = {"source": "auto"}  # e.g. CVAT's own auto-annotation added it
    (tmp_path / "c.json").write_text(json.dumps(coco))
    edits = ingest_coco(tmp_path / "c.json", records, complete=False, round=2).edits
    assert {e.extra.get("coco_id"): e.provenance.source for e in edits} == {101: "human", 9001: "model", 9002: "human"}


ANN_101 = "image 'img_a.jpg' annotation 101"


@pytest.mark.parametrize(
    "part, change, item, reason",
    [
        ("annotations", {"segmentation": TOO_TALL}, ANN_101, "RLE size 25x32 does not match the image's 24x32"),
        ("annotations", {"segmentation": EMPTY}, ANN_101, "empty mask"),
        ("annotations", {"segmentation": [[1, 1, 40, 1, 40, 5]]}, ANN_101, "vertex (40, 1) lies outside the 32x24 image"),
        ("annotations", {"segmentation": "nonsense"}, ANN_101, "neither polygons nor an RLE"),
        ("annotations", {"image_id": 999}, "annotation 101", "refers to unknown image id 999"),
        ("images", {"file_name": "stranger.jpg"}, "image 'stranger.jpg'", "is not among the exported images"),
        ("images", {"width": W + 2}, "image 'img_a.jpg'", "is 34x24 in the file but the exported image is 32x24"),
    ],
)
def test_bad_coco_items_are_skipped_naming_file_and_item(tmp_path: Path, records: dict, part, change, item, reason) -> None:
    export_coco(records, tmp_path / "export.json")
    coco = json.loads((tmp_path / "export.json").read_text())
    coco["images"].sort(key=lambda i: i["file_name"])
    coco["annotations"].sort(key=lambda a: a["id"])
    coco[part][0].update(change)  # img_a's entry, or its annotation 101
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    result = ingest_coco(tmp_path / "bad.json", records, complete=True, round=2)
    ((where, why),) = result.skipped
    assert where == f"{tmp_path / 'bad.json'}: {item}" and reason in why
    # A person kept something where the bad item was: nothing of img_a is deleted on its account.
    assert [e for e in result.edits if e.action == "delete"] == []


def test_unreadable_sam_id_withholds_the_images_deletions(tmp_path: Path, records: dict) -> None:
    export_coco(records, tmp_path / "export.json")
    coco = json.loads((tmp_path / "export.json").read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["id"] != 102]  # a person deleted 102...
    next(a for a in coco["annotations"] if a["id"] == 101)["attributes"]["sam_id"] = "1O1"  # ...and 101's id got mangled
    (tmp_path / "c.json").write_text(json.dumps(coco))
    result = ingest_coco(tmp_path / "c.json", records, complete=True, round=2)
    assert result.edits == []  # 101 may be the kept one, or 102: deleting either could lose a kept mask
    assert result.skipped == [
        (f"{tmp_path / 'c.json'}: image 'img_a.jpg' annotation 101", "sam_id '1O1' is not an annotation id"),
        (f"{tmp_path / 'c.json'}: image 'img_a.jpg'", "no deletions: a left-out shape names sam_id '1O1', so which mask it keeps is unknown"),
    ]


def test_malformed_coco_file_is_an_error_naming_it(tmp_path: Path, records: dict) -> None:
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON"):
        ingest_coco(tmp_path / "broken.json", records, complete=True, round=2)
    (tmp_path / "other.json").write_text('{"annotations": []}')
    with pytest.raises(ValueError, match=r"other\.json: not a COCO instances file"):
        ingest_coco(tmp_path / "other.json", records, complete=True, round=2)


# ---------------------------------------------------------------- CVAT XML

def test_cvat_rle_decodes_row_major_background_first() -> None:
    # A 3 wide x 2 high box, runs 1 bg, 2 fg, 2 bg, 1 fg:  . # #  /  . . #
    assert decode_cvat_rle([1, 2, 2, 1], width=3, height=2).tolist() == [[False, True, True], [False, False, True]]
    # Starting in the foreground takes a leading zero-length background run.
    assert decode_cvat_rle([0, 1, 5], width=3, height=2).tolist() == [[True, False, False], [False, False, False]]
    # A hole: a 4 x 3 ring.
    assert decode_cvat_rle([0, 5, 2, 5], width=4, height=3).astype(int).tolist() == [[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="cover 5 pixels, its 3x2 box has 6"):
        decode_cvat_rle([1, 2, 2], width=3, height=2)
    with pytest.raises(ValueError, match="non-negative"):
        decode_cvat_rle([3, -1, 4], width=3, height=2)


def cvat_xml(images: str, meta: str = "") -> str:
    return f'<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>{meta}{images}</annotations>'


JOB_META = """<meta><job><id>42</id><size>2</size><mode>annotation</mode>
  <owner><username>admin</username></owner><assignee><username>alice</username></assignee></job>
  <dumped>2024-05-01 12:00:00.123456+02:00</dumped></meta>"""


def test_cvat_xml_gives_exact_masks_prompts_and_deletions(tmp_path: Path, records: dict) -> None:
    unchanged = cvat_rle(box_mask(1, 6, 20, 30)[1:6, 20:30])  # 103 exactly as exported
    xml = cvat_xml(
        f"""<image id="0" name="frames/img_a.jpg" width="{W}" height="{H}">
    <mask label="object" source="manual" occluded="0" rle="0, 5, 2, 5" left="5" top="6" width="4" height="3" z_order="0">
      <attribute name="sam_id">101</attribute></mask>
    <mask label="object" source="auto" rle="{unchanged}" left="20" top="1" width="10" height="5">
      <attribute name="sam_id">103</attribute></mask>
    <mask label="object" source="manual" rle="0, 6" left="{W - 3}" top="{H - 2}" width="3" height="2"></mask>
    <mask label="object" source="auto" rle="0, 2" left="0" top="0" width="1" height="2"></mask>
    <polygon label="object" source="manual" points="2,2;10,2;10,8;2,8" z_order="0"></polygon>
    <box label="object" source="manual" xtl="0" ytl="0" xbr="{W}" ybr="{H}" occluded="0"></box>
    <points label="object" source="manual" points="3.5,4.5;10,12"></points>
    <box label="object" xtl="4.25" ytl="5" xbr="9" ybr="11.5" group_id="1"></box>
    <points label="negative" points="6,7" group_id="1"></points>
  </image>
  <image id="1" name="img_b.jpg" width="{W}" height="{H}">
    <mask label="object" rle="{cvat_rle(box_mask(0, H, 0, W // 2)[:, :W // 2])}" left="0" top="0" width="{W // 2}" height="{H}">
      <attribute name="sam_id">201</attribute></mask>
  </image>""",
        JOB_META,
    )
    (tmp_path / "annotations.xml").write_text(xml)
    result = ingest_cvat(tmp_path / "annotations.xml", records, complete=True, round=3)
    assert result.skipped == []
    actions = by_action(result.edits)
    assert {e.image for e in result.edits} == {"img_a"}

    (replaced,) = actions["replace"]  # 101 redrawn as a 4 x 3 ring at (5, 6); 103 came back identical
    ring = box_mask(6, 9, 5, 9)
    ring[7, 6:8] = False
    assert replaced.target == 101 and np.array_equal(decoded(replaced), ring)
    assert [e.target for e in actions["delete"]] == [102]

    masks = [e for e in actions["add"] if e.rle is not None]
    assert [e.extra["cvat_shape"] for e in masks] == ["mask", "mask", "polygon"]
    assert np.array_equal(decoded(masks[0]), box_mask(H - 2, H, W - 3, W))  # touches the right and bottom border
    assert np.array_equal(decoded(masks[1]), box_mask(0, 2, 0, 1))  # touches the left and top border
    assert np.array_equal(decoded(masks[2]), box_mask(2, 8, 2, 10))
    assert [e.provenance.source for e in masks] == ["human", "model", "human"]  # source="auto" on a new shape

    prompts = [e.prompt for e in actions["add"] if e.prompt is not None]
    assert prompts == [
        Prompt(box=(0.0, 0.0, float(W), float(H))),
        Prompt(points=((3.5, 4.5), (10.0, 12.0)), labels=(1, 1)),
        Prompt(box=(4.25, 5.0, 9.0, 11.5), points=((6.0, 7.0),), labels=(0,)),  # grouped box + negative click
    ]
    human = [e for e in result.edits if e.provenance.source == "human"]
    assert {(e.provenance.annotator, e.provenance.task_id, e.provenance.time, e.provenance.round) for e in human} == {
        ("alice", "job/42", "2024-05-01T10:00:00+00:00", 3)
    }


def test_a_copied_shape_is_a_new_mask_not_a_second_correction(tmp_path: Path, records: dict) -> None:
    exported_101 = box_mask(2, 10, 3, 12)
    shapes = "".join(
        f'<mask label="object" rle="{cvat_rle(exported_101[2:10, 3:12])}" left="{left}" top="2" width="9" height="8">'
        '<attribute name="sam_id">101</attribute></mask>'
        for left in (3, 20)  # the original, then a copy pasted to the right
    )
    (tmp_path / "a.xml").write_text(cvat_xml(f'<image id="0" name="img_a.jpg" width="{W}" height="{H}">{shapes}</image>'))
    (added,) = ingest_cvat(tmp_path / "a.xml", records, complete=False, round=3).edits
    assert added.action == "add" and np.array_equal(decoded(added), box_mask(2, 10, 20, 29))


def test_cvat_without_complete_deletes_nothing(tmp_path: Path, records: dict) -> None:
    xml = cvat_xml(f'<image id="0" name="img_a.jpg" width="{W}" height="{H}" task_id="5"></image>')  # a project export
    (tmp_path / "a.xml").write_text(xml)
    assert ingest_cvat(tmp_path / "a.xml", records, complete=False, round=3).edits == []
    deletes = ingest_cvat(tmp_path / "a.xml", records, complete=True, round=3, annotator="dan").edits
    assert sorted(e.target for e in deletes) == [101, 102, 103]
    assert {(e.action, e.provenance.annotator, e.provenance.task_id) for e in deletes} == {("delete", "dan", "task/5")}


def claims_101(shape: str) -> str:
    """A CVAT shape element carrying sam_id 101."""
    tag = shape[1 : shape.index(" ")]
    return f'{shape}<attribute name="sam_id">101</attribute></{tag}>'


@pytest.mark.parametrize(
    "shape, item, reason",
    [
        (claims_101('<mask rle="0, 12" left="30" top="0" width="4" height="3">'), "<mask> #0", "mask box 4x3 at (30, 0) lies outside"),
        (claims_101('<mask rle="0, 11" left="0" top="0" width="4" height="3">'), "<mask> #0", "rle runs cover 11 pixels, its 4x3 box has 12"),
        (claims_101('<mask rle="12" left="0" top="0" width="4" height="3">'), "<mask> #0", "empty mask"),
        (claims_101('<mask rle="a, b" left="0" top="0" width="4" height="3">'), "<mask> #0", "must be integers"),
        (claims_101('<polygon points="1,1;2,2">'), "<polygon> #0", "polygon has 2 points, needs at least 3"),
        (claims_101('<polygon points="1,1;50,2;3,9">'), "<polygon> #0", "vertex (50, 2) lies outside the 32x24 image"),
        (claims_101('<polyline points="1,1;2,2">'), "<polyline> #0", "not supported"),
        ('<box label="o" xtl="5" ytl="5" xbr="40" ybr="9"></box>', "<box> #0", "leaves the 32x24 image"),
        ('<points label="o" points="5,-1"></points>', "<points> #0", "point (5.0, -1.0) lies outside"),
    ],
)
def test_bad_cvat_shapes_are_skipped_naming_file_image_and_shape(tmp_path: Path, records: dict, shape, item, reason) -> None:
    (tmp_path / "a.xml").write_text(cvat_xml(f'<image id="0" name="img_a.jpg" width="{W}" height="{H}">{shape}</image>'))
    result = ingest_cvat(tmp_path / "a.xml", records, complete=True, round=3)
    ((where, why),) = result.skipped
    assert where == f"{tmp_path / 'a.xml'}: image 'img_a.jpg' {item}" and reason in why
    assert sorted(e.target for e in result.edits) == ([102, 103] if "sam_id" in shape else [101, 102, 103])


def test_cvat_unknown_or_resized_image_is_skipped(tmp_path: Path, records: dict) -> None:
    xml = cvat_xml(f'<image id="0" name="ghost.jpg" width="{W}" height="{H}"/><image id="1" name="img_b.jpg" width="{W}" height="9"/>')
    (tmp_path / "a.xml").write_text(xml)
    result = ingest_cvat(tmp_path / "a.xml", records, complete=True, round=3)
    assert result.edits == []
    assert result.skipped == [
        (f"{tmp_path / 'a.xml'}: image 'ghost.jpg'", "is not among the exported images"),
        (f"{tmp_path / 'a.xml'}: image 'img_b.jpg'", "is 32x9 in the file but the exported image is 32x24"),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<annotations><image></annotations>", "malformed XML"),
        ("<coco/>", "not CVAT XML"),
        (
            '<?xml version="1.0"?><!DOCTYPE annotations [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
            '<annotations><image id="0" name="&xxe;" width="32" height="24"/></annotations>',
            "DTDs and entities are refused",
        ),
        (
            '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><annotations>&b;</annotations>',
            "DTDs and entities are refused",
        ),
        ('<?xml version="1.0"?><!DOCTYPE annotations SYSTEM "http://attacker.invalid/x.dtd"><annotations/>', "DTDs and entities are refused"),
        ('<?xml version="1.0"?><annotations><image name="&undeclared;"/></annotations>', "malformed XML"),
    ],
)
def test_bad_cvat_file_is_an_error_naming_it(tmp_path: Path, records: dict, text: str, message: str) -> None:
    (tmp_path / "evil.xml").write_text(text)
    with pytest.raises(ValueError, match=rf"evil\.xml: .*{message}"):
        ingest_cvat(tmp_path / "evil.xml", records, complete=True, round=3)


# ---------------------------------------------------------------- SA-1B

def test_sa1b_corrections_add_and_replace_by_provenance_corrects(tmp_path: Path, records: dict) -> None:
    folder = tmp_path / "sam_b_output"
    folder.mkdir()
    fixed, extra, same_id = box_mask(2, 11, 3, 12), donut(10, 20, 16, 30), box_mask(20, 24, 20, 24)
    anns = [
        sa1b.make_annotation(fixed, 7) | {"provenance": {"corrects": 101, "annotator": "bob", "time": "2024-01-02T03:04:05Z"}},
        sa1b.make_annotation(extra, 8) | {"provenance": {"source": "model", "round": 0, "task_id": "sam-b"}},
        sa1b.make_annotation(same_id, 102),  # the same id as one of ours means nothing: an add
        sa1b.make_annotation(fixed, 9) | {"provenance": {"corrects": 999}},
        {"id": 10, "segmentation": rle.encode(np.ones((H, W + 1), bool))},
    ]
    (folder / "img_a.json").write_text(json.dumps(sa1b.make_record(1, "img_a.jpg", H, W, anns)))
    (folder / "unknown.json").write_text(json.dumps(sa1b.make_record(2, "unknown.jpg", H, W, [])))
    (folder / "truncated.json").write_text('{"image": {"width": 3')
    result = ingest_sa1b(folder, records, round=4, annotator="eve")

    actions = by_action(result.edits)
    (replaced,) = actions["replace"]
    assert replaced.target == 101 and np.array_equal(decoded(replaced), fixed)
    assert (replaced.provenance.source, replaced.provenance.annotator, replaced.provenance.time) == ("human", "bob", "2024-01-02T03:04:05+00:00")
    assert [(e.extra["sa1b_id"], e.target) for e in actions["add"]] == [(8, None), (102, None)]
    assert np.array_equal(decoded(actions["add"][0]), extra) and not decoded(actions["add"][0])[15, 23]
    model_made = actions["add"][0].provenance
    assert (model_made.source, model_made.task_id, model_made.annotator) == ("model", "sam-b", None)
    assert actions["add"][1].provenance.annotator == "eve" and actions["delete"] == []
    assert {e.provenance.round for e in result.edits} == {4}
    skipped = dict(result.skipped)
    assert "provenance.corrects names mask 999" in skipped[f"{folder / 'img_a.json'}: image 'img_a' annotation 9"]
    assert "RLE size 24x33 does not match" in skipped[f"{folder / 'img_a.json'}: image 'img_a' annotation 10"]
    assert skipped[f"{folder / 'unknown.json'}: image 'unknown'"] == "is not among the exported images"
    assert "malformed JSON" in skipped[str(folder / "truncated.json")]
    assert len(skipped) == 4


def test_sa1b_identical_correction_is_no_edit(tmp_path: Path, records: dict) -> None:
    same = copy.deepcopy(records["img_b"])
    same["annotations"][0]["provenance"] = {"corrects": 201}
    (tmp_path / "img_b.json").write_text(json.dumps(same))
    assert ingest_sa1b([tmp_path / "img_b.json"], records, round=4).edits == []
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        ingest_sa1b(tmp_path / "nowhere.json", records, round=4)
