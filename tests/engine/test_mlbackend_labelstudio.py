"""`sam-train serve` connected to a real Label Studio on 127.0.0.1 through Label Studio's ML API: a smart
keypoint placed on a task comes back as our mask, and a submitted annotation reaches our journal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sam_train.data.convert import coco_mask
from sam_train.engine import brush_rle
from sam_train.engine import labelstudio as ls
from sam_train.engine.interactive import EmbeddingStore, InteractiveSegmenter
from sam_train.engine.journal import AnnotationJournal
from sam_train.engine.records import Prompt
from sam_train.model import build_sam
from tests.conftest import free_port
from tests.engine.conftest import LabelStudioServer
from tests.engine.test_mlbackend import H, W, keypoint, png, rectangle, scene

pytestmark = pytest.mark.slow  # a real Label Studio server

REPO = Path(__file__).resolve().parents[2]


def start_backend(workdir: Path, checkpoint: str = "builtin", port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`sam-train serve CKPT` in its own process on a (free) loopback port, once /health answers."""
    port = port or free_port()
    log = open(workdir.parent / "serve.log", "wb")  # noqa: SIM115 (the process writes it while it runs)
    process = subprocess.Popen(
        [sys.executable, "-m", "sam_train.cli", "serve", checkpoint, "--port", str(port), "--workdir", str(workdir)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, (workdir.parent / "serve.log").read_text()
        if ls.LabelStudio(url, "unused", timeout=2).health():
            return process, url
        time.sleep(0.3)
    process.kill()
    raise AssertionError(f"the backend did not come up:\n{(workdir.parent / 'serve.log').read_text()}")


def test_label_studio_clicks_are_answered_by_our_backend_and_annotations_reach_the_journal(
    label_studio: LabelStudioServer, tmp_path: Path
) -> None:
    pixels = scene()
    folder = label_studio.files_root / "assisted"
    folder.mkdir()
    (folder / "scene.png").write_bytes(png(pixels))
    workdir = tmp_path / "serve"
    backend_process, backend_url = start_backend(workdir)
    try:
        client = label_studio.client()
        project = client.create_project("assisted labelling", label_config=ls.ASSISTED_LABEL_CONFIG)
        client.connect_local_files(project["id"], folder)
        url = ls.local_file_url(folder / "scene.png", label_studio.files_root)
        (task_id,) = client.import_tasks(project["id"], [{"data": {"image": url, "key": "scene", "round": 1,
                                                                    "width": W, "height": H}}])
        backend = client.connect_ml_backend(project["id"], backend_url)  # /health and /setup, as the UI's "Connect"

        # What the editor sends when a person places smart regions; our masks come back through Label Studio.
        oracle = InteractiveSegmenter(EmbeddingStore(build_sam("tiny", pretrained=True)))
        load = lambda: (pixels, b"")  # noqa: E731
        click, refine = keypoint(55, 45), keypoint(100, 75, positive=False)
        for context, prompt in (
            ([click], Prompt(points=((55.0, 45.0),), labels=(1,))),
            ([click, refine], Prompt(points=((55.0, 45.0), (100.0, 75.0)), labels=(1, 0))),
            ([rectangle(20, 20, 90, 70)], Prompt(box=(20.0, 20.0, 90.0, 70.0))),
        ):
            data = client.interactive_annotate(backend["id"], task_id, {"result": context})
            (region,) = data["result"]
            assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", ls.MASK, ls.IMAGE)
            assert (region["original_width"], region["original_height"]) == (W, H)
            mask = brush_rle.decode(region["value"]["rle"], H, W)
            expected = oracle.segment("scene", load, prompt)  # the refining click reuses the first's logits too
            assert np.array_equal(mask, expected.mask), f"{[r['type'] for r in context]}: not the model's mask"
            assert mask.any()
        inside = mask[20:70, 20:90].sum() / mask.sum()  # SAM is free to spill a few edge pixels past a box
        assert inside > 0.98, f"a box prompt's mask lies in the box: {inside:.1%} of it does"

        # The person keeps the mask and submits: Label Studio's webhook hands it to our journal.
        kept = {**region, "id": "sam1"}
        created = client.annotate(task_id, [{**click, "id": "k1"}, kept])
        journal = AnnotationJournal(workdir / "annotations.jsonl")
        deadline = time.monotonic() + 60
        while not journal.tasks() and time.monotonic() < deadline:
            time.sleep(0.2)
        backend_process.send_signal(signal.SIGKILL)  # nothing the journal acknowledged may be lost
        backend_process.wait()
        (task,) = journal.tasks()
        assert task["id"] == task_id and [a["id"] for a in task["annotations"]] == [created["id"]]
        parsed = ls.parse_export(journal.tasks(), round=1)
        assert not parsed.skipped, parsed.skipped
        (edit,) = parsed.edits  # the smart click is the tool's input, not a label
        assert edit.action == "add" and edit.image == "scene" and edit.provenance.annotator == label_studio.user
        assert np.array_equal(coco_mask(edit.rle, H, W), mask)
    finally:
        if backend_process.poll() is None:
            backend_process.kill()
            backend_process.wait()
