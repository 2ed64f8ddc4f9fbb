"""The loop against a real Label Studio on 127.0.0.1: tasks pushed once, the person's annotations ingested exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sam_train.data.synth import synth_dataset
from sam_train.engine.loop import CRASH_ENV, Engine, init_workdir

from .test_loop import MINIATURE, labels

pytestmark = pytest.mark.slow  # a real Label Studio server


def test_engine_round_through_label_studio_survives_kills(label_studio):
    root = label_studio.files_root / "engine"  # under the server's document root: it serves the pool images
    pool = label_studio.files_root / "pool-shards"
    synth_dataset(pool, images=2, seed=3, samples_per_shard=4, workers=1, style="cells")
    init_workdir(root, [pool], [
        *MINIATURE, "rounds=1", "images_per_round=2", "backend=labelstudio", f"data.truth=[{pool}]",
        f"labelstudio.url={label_studio.url}", f"labelstudio.token={label_studio.token}",
        f"labelstudio.document_root={label_studio.files_root}", "labelstudio.poll_seconds=1",
    ])
    run = [sys.executable, "-m", "sam_train.cli", "engine", "run", str(root)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    # Killed after the tasks are in Label Studio but before the journal knows, then after the
    # person's first submission: the reruns must neither import nor annotate anything twice.
    for point in ("1:export:end", "1:annotate:item"):
        done = subprocess.run(run, env={**env, CRASH_ENV: point}, capture_output=True, text=True, timeout=600)
        assert done.returncode == -9, done.stderr[-2000:]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    engine = Engine(root)
    client = label_studio.client()
    project = engine.journal.done()[(1, "export")]["project"]
    tasks = client.tasks(project)
    assert sorted(t["data"]["key"] for t in tasks) == sorted(engine.round_keys(1)), "each image is one task, once"
    exported = json.loads((engine.round_dir(1) / "corrections" / "labelstudio.json").read_text())
    assert all(len(t["annotations"]) == 1 for t in exported), "each task was annotated exactly once"
    # What the person submitted through the server is exactly what the dataset version holds.
    submitted = {t["data"]["key"]: sorted(r["id"] for r in t["annotations"][0]["result"]) for t in exported}
    saved = {k: sorted(r["id"] for r in json.loads((engine.round_dir(1) / "annotator" / f"{k}.json").read_text())["result"])
             for k in submitted}
    assert submitted == saved
    version = labels(engine, "v001")
    for key, regions in submitted.items():
        assert len(version[key]) == len(regions)
        kept = {int(r[1:]) for r in regions if r.startswith("m")}
        model_ids = {ann[0] for ann in version[key] if ann[2] == "model"}
        assert model_ids <= kept, "a model mask survives only if the person kept it"
    by_person = [json.loads(line)["provenance"] for line in (engine.round_dir(1) / "edits.jsonl").read_text().splitlines()]
    assert by_person and all(p["annotator"] == label_studio.user and p["source"] == "human" for p in by_person)


def test_assisted_round_through_label_studio_and_our_backend(label_studio):
    from sam_train.engine.journal import AnnotationJournal
    from tests.conftest import free_port
    from tests.engine.test_mlbackend_labelstudio import start_backend

    root = label_studio.files_root / "engine-assisted"
    pool = label_studio.files_root / "assisted-pool-shards"
    synth_dataset(pool, images=2, seed=5, samples_per_shard=4, workers=1, style="cells")
    port = free_port()
    init_workdir(root, [pool], [
        *MINIATURE, "rounds=1", "images_per_round=2", "assisted_rounds=1", "backend=labelstudio", f"data.truth=[{pool}]",
        f"labelstudio.url={label_studio.url}", f"labelstudio.token={label_studio.token}",
        f"labelstudio.document_root={label_studio.files_root}", "labelstudio.poll_seconds=1",
        f"labelstudio.ml_backend=http://127.0.0.1:{port}",
    ])
    # The person's tool: our backend following the work folder's round models, journaling into it.
    backend, _ = start_backend(root, str(root), port)
    try:
        Engine(root).run(log=lambda line: None)
    finally:
        backend.kill()
        backend.wait()
    engine = Engine(root)
    journaled = AnnotationJournal(root / "annotations.jsonl").tasks()
    assert sorted(t["data"]["key"] for t in journaled) == sorted(engine.round_keys(1))
    ingested = json.loads((engine.round_dir(1) / "corrections" / "labelstudio.json").read_text())
    assert ingested == journaled, "the round ingests exactly what the webhook journaled"
    version = labels(engine, "v001")
    for key in engine.round_keys(1):
        saved = json.loads((engine.round_dir(1) / "annotator" / f"{key}.json").read_text())
        assert saved["work"]["clicks"] > 0 and len(version[key]) == saved["work"]["added"] == len(saved["result"])
    assert len(list((root / "embeddings").glob("*/*.safetensors"))) == 2, "the backend embedded each image once"
    provenance = [json.loads(line)["provenance"] for line in (engine.round_dir(1) / "edits.jsonl").read_text().splitlines()]
    assert provenance and all(p["annotator"] == label_studio.user and p["source"] == "human" for p in provenance)


def test_people_see_each_rounds_masks_in_the_label_stream(label_studio):
    """Label Studio pre-fills the editor only with the project's model version, which it sets at the first
    import: each push makes it the round's own, or round 2's people would start from no masks at all."""
    root = label_studio.files_root / "engine-people"
    pool = label_studio.files_root / "people-pool-shards"
    synth_dataset(pool, images=4, seed=7, samples_per_shard=4, workers=1, style="cells")
    init_workdir(root, [pool], [
        *MINIATURE, "images_per_round=2", "backend=labelstudio", "annotator.kind=people",
        f"labelstudio.url={label_studio.url}", f"labelstudio.token={label_studio.token}",
        f"labelstudio.document_root={label_studio.files_root}",
    ])
    client = label_studio.client()
    for r in (1, 2):
        Engine(root).run(rounds=2, wait=False, log=lambda line: None)  # stops at round r's annotate step
        project = Engine(root).journal.done()[(r, "export")]["project"]
        for _ in Engine(root).round_keys(r):  # a person pressing "Label All Tasks", then Submit, task after task
            task = client.request("GET", f"/api/projects/{project}/next")
            assert task["data"]["round"] == r
            (prediction,) = task["predictions"]
            assert prediction["model_version"] == f"sam-train-round-{r}" and prediction["result"]
            client.annotate(task["id"], prediction["result"], parent_prediction=prediction["id"])
    Engine(root).run(rounds=2, wait=False, log=lambda line: None)
    assert Engine(root).next_step() == (3, "train")
