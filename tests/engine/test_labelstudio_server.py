"""The Label Studio round trip against a real server on 127.0.0.1: import tasks with our masks as
predictions, submit what a person would, export, and check the engine reads back exactly that."""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from sam_train.data import rle as coco_rle
from sam_train.data.sa1b import make_annotation, make_record
from sam_train.engine import labelstudio as ls
from sam_train.engine.records import Edit, Prompt, Provenance
from tests.engine.conftest import LabelStudioServer

pytestmark = pytest.mark.slow  # a real Label Studio server

H, W = 48, 64


def rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def sa1b(image_id: int, masks: dict[int, np.ndarray]) -> dict:
    annotations = [make_annotation(m, k, predicted_iou=0.9) for k, m in masks.items()]
    return make_record(image_id, f"{image_id}.png", H, W, annotations)


def test_round_trip_through_a_real_server(label_studio: LabelStudioServer) -> None:
    client = label_studio.client()
    assert client.health()
    project = client.create_project("engine round trip")

    # One image from disk through local-files storage, the others inline as data: URIs.
    folder = label_studio.files_root / "round1"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(0))
    client.connect_local_files(project["id"], folder)
    inline = "data:image/png;base64," + base64.b64encode(png(1)).decode()
    masks = {1: rect(2, 20, 3, 30), 2: rect(25, 40, 10, 50), 3: rect(5, 15, 40, 60)}
    tasks = [
        ls.record_to_task(sa1b(1, masks), ls.local_file_url(folder / "a.png", label_studio.files_root), "a", 0),
        ls.record_to_task(sa1b(2, {4: rect(0, 10, 0, 10)}), inline, "b", 0),
        ls.record_to_task(sa1b(3, {5: rect(30, 40, 30, 40)}), inline, "c", 0),
        ls.record_to_task(sa1b(4, {6: rect(1, 2, 1, 2)}), inline, "d", 0),
    ]
    ids = client.import_tasks(project["id"], tasks)
    listed = sorted(client.tasks(project["id"]), key=lambda t: t["id"])
    assert [t["data"]["key"] for t in listed] == ["a", "b", "c", "d"]
    assert client.request("GET", tasks[0]["data"]["image"], raw=True) == (folder / "a.png").read_bytes()

    # Task a, as a person edits it: repaint m1, delete m2, keep m3, paint an object with a hole,
    # box another with a negative click related to the box, and click a third. (Coordinates whose
    # percentages are exact binary fractions, so pixels -> percent -> pixels compares with ==.)
    corrected = masks[1] & ~rect(2, 8, 3, 30)
    ring = rect(20, 46, 2, 26) & ~rect(28, 38, 8, 18)
    kept = tasks[0]["predictions"][0]["result"][2]
    submitted = [
        ls.brush_result(corrected, "m1"), kept, ls.brush_result(ring, "n7Hq2"),
        ls.box_result((30, 12, 62, 36), W, H, "box1"), ls.point_result((45, 33), False, W, H, "neg1"),
        ls.relation_result("neg1", "box1"), ls.point_result((8.5, 42), True, W, H, "pos1"),
    ]
    made = client.annotate(ids[0], submitted, lead_time=42.0)
    # Task b: accepted as predicted. Task c: a region whose RLE is garbage (stored all the same).
    # Task d: skipped by the person.
    client.annotate(ids[1], tasks[1]["predictions"][0]["result"])
    garbage = ls.brush_result(rect(0, 5, 0, 5), "n9")
    garbage["value"]["rle"] = garbage["value"]["rle"][:-3]
    client.annotate(ids[2], [garbage])
    client.annotate(ids[3], [], was_cancelled=True)

    export = client.export(project["id"])
    parsed = ls.parse_export(export, round=1)

    saved = datetime.fromisoformat(made["updated_at"].replace("Z", "+00:00")).astimezone(timezone.utc)
    who = Provenance("human", 1, label_studio.user, str(ids[0]), saved.replace(microsecond=0).isoformat())

    def extra(**fields) -> dict:
        return {**fields, "annotation_id": made["id"]}

    assert parsed.edits == [
        Edit("a", "replace", who, rle=coco_rle.encode(corrected), target=1, label="object",
             extra=extra(region_id="m1")),
        Edit("a", "add", who, rle=coco_rle.encode(ring), label="object", extra=extra(region_id="n7Hq2")),
        Edit("a", "delete", who, target=2, extra=extra(region_id="m2")),
        Edit("a", "add", who, prompt=Prompt(box=(30.0, 12.0, 62.0, 36.0), points=((45.0, 33.0),), labels=(0,)),
             label="object", extra=extra(region_ids=["box1", "neg1"])),
        Edit("a", "add", who, prompt=Prompt(points=((8.5, 42.0),), labels=(1,)), extra=extra(region_ids=["pos1"])),
    ]
    assert parsed.skipped == [(f"task {ids[2]} (image c)", parsed.skipped[0][1])]
    assert "region n9: brush RLE stops after" in parsed.skipped[0][1]
    assert parsed.unannotated == [str(ids[3])]
    assert parsed.superseded == [] and parsed.drafts == []


def test_personal_access_token_works_like_the_legacy_token(label_studio: LabelStudioServer) -> None:
    """The token Label Studio 1.23's Account page hands out (a JWT, refused as `Token <t>`) is exchanged
    for short-lived access tokens, renewed when one expires, by the engine's client and by `serve`."""
    from sam_train.engine.mlbackend import ImageSource

    legacy = label_studio.client()
    pat = legacy.request("POST", "/api/token/")["token"]  # what the Account page's "Create" button calls
    assert ls.is_personal_access_token(pat) and not ls.is_personal_access_token(label_studio.token)
    client = ls.LabelStudio(label_studio.url, pat)
    assert client.request("GET", "/api/current-user/whoami")["email"] == label_studio.user
    client._access = client._access[:-4] + "xxxx"  # as if the 5-minute access token had expired
    assert client.request("GET", "/api/current-user/whoami")["email"] == label_studio.user

    project = legacy.create_project("personal access token")
    folder = label_studio.files_root / "pat"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(7))
    legacy.connect_local_files(project["id"], folder)
    url = ls.local_file_url(folder / "a.png", label_studio.files_root)
    assert ImageSource(label_studio.url, pat).load(url, "task 1")[1] == png(7)
