"""`sam-train data synth`: deterministic for a seed, whatever the worker count; every SA-1B field filled."""

from __future__ import annotations

import json
import subprocess
import sys

from sam_train.data.sa1b import check_annotation, parse_record
from sam_train.data.shards import iter_raw_samples, read_manifest, resolve_shards
from sam_train.data.synth import synth_dataset

FIELDS = {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = synth_dataset(tmp_path / "a", images=6, seed=3, samples_per_shard=4, workers=1)
    b = synth_dataset(tmp_path / "b", images=6, seed=3, samples_per_shard=4, workers=2)
    c = synth_dataset(tmp_path / "c", images=6, seed=4, samples_per_shard=4, workers=1)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]
    assert [s["samples"] for s in a["shards"]] == [4, 2]


def test_samples_are_valid_sa1b_with_varied_non_square_sizes(tmp_path):
    synth_dataset(tmp_path / "d", images=8, seed=0, samples_per_shard=8, workers=1)
    sizes = set()
    for ref in resolve_shards([str(tmp_path / "d")]):
        for raw in iter_raw_samples(ref.url):
            record = parse_record(raw.members["json"])
            h, w = record["image"]["height"], record["image"]["width"]
            sizes.add((h, w))
            assert h != w and len(record["annotations"]) >= 3
            for ann in record["annotations"]:
                assert set(ann) == FIELDS
                check_annotation(ann, h, w)  # RLE size, area and bbox agree with the mask
                x, y = ann["point_coords"][0]
                assert ann["bbox"][0] <= x <= ann["bbox"][0] + ann["bbox"][2]
    assert len(sizes) == 8


def test_cli_writes_shards_and_manifest(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "sam_train.cli", "data", "synth", str(out), "--images", "5", "--seed", "1",
         "--samples-per-shard", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"5 synthetic samples in 3 shards -> {out}" in result.stdout
    manifest = read_manifest(out)
    assert manifest["total_samples"] == 5 and manifest["source"] == {"kind": "synthetic", "seed": 1, "images": 5}
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == 1
