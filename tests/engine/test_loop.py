"""The data-engine loop end to end on a miniature: rounds, immutable versions, exact ingestion, kill -9 anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam_train.data.shards import iter_raw_samples, read_manifest, resolve_shards
from sam_train.data.synth import synth_dataset
from sam_train.engine import brush_rle
from sam_train.engine.interactive import EmbeddingStore, InteractiveSegmenter
from sam_train.engine.journal import AnnotationJournal
from sam_train.engine.loop import CRASH_ENV, STEPS, Engine, current_model, init_workdir
from sam_train.engine.mlbackend import Backend, ImageSource, ModelSource
from sam_train.model import build_sam, export_official
from tests.conftest import free_port, perturb_all_weights_
from tests.engine.conftest import serving_backend

# Seconds, not minutes: a 4 x 4 grid, 2 training steps, 3 images a round.
MINIATURE = [
    "images_per_round=3",
    "rounds=2",
    "autolabel.overrides=['amg.points_per_side=4','amg.pred_iou_thresh=0','amg.stability_score_thresh=0']",
    "train.overrides=['experiment=engine_round','total_steps=2','data.batch_size=2']",
    "annotator.max_clicks=3",
    "annotator.clicks_per_image=12",
]


@pytest.fixture(scope="module")
def domain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cells")
    synth_dataset(root / "pool", images=6, seed=1, samples_per_shard=4, workers=1, style="cells")
    synth_dataset(root / "eval", images=3, seed=2, samples_per_shard=4, workers=1, style="cells")
    return {"pool": root / "pool", "eval": root / "eval"}


def overrides(domain: dict[str, Path]) -> list[str]:
    return [*MINIATURE, f"data.truth=[{domain['pool']}]", f"data.eval=[{domain['eval']}]"]


@pytest.fixture(scope="module")
def finished(domain, tmp_path_factory) -> Engine:
    """An uninterrupted 2-round loop: the reference the interrupted one must reproduce."""
    root = init_workdir(tmp_path_factory.mktemp("engine") / "work", [domain["pool"]], overrides(domain))
    engine = Engine(root)
    engine.run(log=lambda line: None)
    return engine


def labels(engine: Engine, version: str) -> dict[str, list[tuple]]:
    """key -> its annotations (id, RLE counts, who made it, what it corrects) in a dataset version."""
    out = {}
    for shard in resolve_shards([engine.root / "versions" / version]):
        for sample in iter_raw_samples(shard.url):
            record = json.loads(sample.members["json"])
            out[sample.key] = [(a["id"], a["segmentation"]["counts"], a["provenance"]["source"],
                                a["provenance"].get("corrects")) for a in record["annotations"]]
    return out


@pytest.mark.slow
def test_rounds_versions_and_exact_ingestion(finished):
    engine = finished
    summaries = json.loads((engine.root / "rounds.json").read_text())
    assert [s["round"] for s in summaries] == [1, 2]
    assert all(0 <= s["miou_1click"] <= 1 and s["images"] == 3 for s in summaries)
    assert [read_manifest(engine.version_dir(v))["total_samples"] for v in (0, 1, 2)] == [0, 3, 6]
    v1, v2 = labels(engine, "v001"), labels(engine, "v002")
    assert set(v1) <= set(v2) and all(v2[k] == v for k, v in v1.items()), "a version extends its parent unchanged"
    assert set(v2) == set(engine.keys), "each pool image is labelled once, in its round"
    # The labels hold exactly what the (simulated) person submitted: their brush masks, and no model mask they deleted.
    for r in (1, 2):
        for key in engine.round_keys(r):
            submitted = json.loads((engine.round_dir(r) / "annotator" / f"{key}.json").read_text())["result"]
            record_masks = {counts for _, counts, _, _ in v2[key]}
            height, width = engine.image(key).shape[:2]
            want = {mask_utils.encode(np.asfortranarray(brush_rle.decode(res["value"]["rle"], height, width)
                                                        .astype(np.uint8)))["counts"].decode() for res in submitted}
            assert record_masks == want, f"round {r} image {key}: labels differ from the submitted annotation"
    # Provenance: people's masks name the annotator and round; corrections name the model mask they replace.
    for r in (1, 2):
        for line in (engine.round_dir(r) / "edits.jsonl").read_text().splitlines():
            edit = json.loads(line)
            assert edit["provenance"]["source"] == "human" and edit["provenance"]["round"] == r
            assert edit["provenance"]["annotator"] == "simulated-annotator"
    assert "round 3, step train" in engine.status()


@pytest.mark.slow
def test_kill_9_at_every_step_loses_and_duplicates_nothing(domain, finished, tmp_path):
    root = init_workdir(tmp_path / "work", [domain["pool"]], overrides(domain))
    points = [f"2:{step}:end" for step in STEPS] + ["1:autolabel:start", "2:annotate:item"]
    run = [sys.executable, "-m", "sam_train.cli", "engine", "run", str(root)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for point in sorted(points, key=lambda p: (p[0], STEPS.index(p.split(":")[1]), p)):
        done = subprocess.run(run, env={**env, CRASH_ENV: point}, capture_output=True, text=True, timeout=600)
        assert done.returncode == -9, f"{point}: expected to be killed, got {done.returncode}\n{done.stderr[-2000:]}"
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    engine = Engine(root)
    assert labels(engine, "v002") == labels(finished, "v002"), "the interrupted loop made exactly the same dataset"
    assert json.loads((root / "rounds.json").read_text()) == json.loads((finished.root / "rounds.json").read_text())
    journal = [e for e in engine.journal.entries() if e["event"] == "done"]
    assert len(journal) == len({(e["round"], e["step"]) for e in journal}), "no step finished twice"


def test_init_refuses_a_used_folder_and_keys_that_clash(domain, tmp_path):
    with pytest.raises(ValueError, match="is not empty"):
        init_workdir(domain["pool"], [domain["pool"]], overrides(domain))
    with pytest.raises(ValueError, match="appears twice"):
        init_workdir(tmp_path / "work", [domain["pool"], domain["pool"]], overrides(domain))
    assert not (tmp_path / "work").exists(), "a failed init leaves nothing behind"


@pytest.mark.parametrize(("setting", "message"), [
    ("annotator.kind=person", r"annotator.kind='person' is not one of simulated, people"),
    ("backend=label-studio", r"backend='label-studio' is not one of local, labelstudio"),
    ("data.truth=[]", r"annotator.kind=simulated \(the default\) needs data.truth"),
])
def test_init_refuses_a_misspelt_choice(domain, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        init_workdir(tmp_path / "work", [domain["pool"]], [*overrides(domain), setting])
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_assisted_round_labels_from_scratch_with_the_backends_clicks(domain, tmp_path):
    root = init_workdir(tmp_path / "work", [domain["pool"]], [*overrides(domain), "assisted_rounds=1", "rounds=1"])
    engine = Engine(root)
    engine.run(log=lambda line: None)
    assert all(not r["annotations"] for r in engine.autolabel_records(1).values()), "the model proposes nothing"
    truth = engine._truth()
    cfg = engine.cfg.annotator
    assert len(list((root / "embeddings").glob("*/*.safetensors"))) == 3, "one cached embedding per clicked image"
    version = labels(engine, "v001")
    ids = set()
    for key in engine.round_keys(1):
        saved = json.loads((engine.round_dir(1) / "annotator" / f"{key}.json").read_text())
        work = saved["work"]
        assert work["kept"] == work["corrected"] == work["deleted"] == 0 and work["added"] == len(version[key])
        assert work["clicks"] <= cfg.clicks_per_image and work["added"] <= sum(t.sum() >= cfg.min_area for t in truth[key])
        height, width = engine.image(key).shape[:2]
        for result in saved["result"]:  # every submitted mask is the tool's answer (or painted truth) for an object
            mask = brush_rle.decode(result["value"]["rle"], height, width)
            best = max((mask & t).sum() / (mask | t).sum() for t in truth[key])
            assert best >= cfg.accept_iou - 1e-6 or any(np.array_equal(mask, t) for t in truth[key])
        assert all(source == "human" for _, _, source, _ in version[key])
        ids |= {ann_id for ann_id, _, _, _ in version[key]}
    total = sum(len(v) for v in version.values())
    assert total > 0 and len(ids) == total, "annotation ids stay unique across the dataset"
    (summary,) = json.loads((root / "rounds.json").read_text())
    assert summary["masks_added"] == total and summary["clicks_per_corrected_mask"] >= 1


def test_an_assisted_round_in_label_studio_refuses_a_backend_serving_another_model(domain, tmp_path):
    """People must click with the round's model: the engine compares it with what the backend's /health reports."""
    port = free_port()
    root = init_workdir(tmp_path / "work", [domain["pool"]], [
        *overrides(domain), "assisted_rounds=2", "backend=labelstudio", f"labelstudio.ml_backend=http://127.0.0.1:{port}",
    ])
    engine = Engine(root)
    engine.step_train(1, wait=False)  # no labels yet: round 1's model is the initial one, copied
    other = export_official(perturb_all_weights_(build_sam("tiny", pretrained=True), seed=5), tmp_path / "other.pth")
    serving = {"path": other}
    source = ModelSource("tiny", lambda: serving["path"],
                         lambda model: InteractiveSegmenter(EmbeddingStore(model, root / "embeddings")))
    with serving_backend(Backend(source, ImageSource(), AnnotationJournal(root / "annotations.jsonl")), port):
        with pytest.raises(ValueError, match=r"serves sam-train-tiny-\w+, but round 1 labels with .*sam-train serve"):
            engine._check_ml_backend(1)
        serving["path"] = current_model(root)  # what `sam-train serve WORKDIR` serves
        assert serving["path"] == engine.model_path(1)
        engine._check_ml_backend(1)
    with pytest.raises(ValueError, match="does not answer /health"):
        engine._check_ml_backend(1)
