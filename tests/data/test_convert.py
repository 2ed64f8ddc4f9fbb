"""`data convert`: SA-1B folders, COCO and instance-label PNGs become shards that decode back exactly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam_train.data import sa1b, shards
from sam_train.data.convert import convert_coco, convert_mask_folder, convert_sa1b_folder

H, W = 48, 64
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_image(path: Path, seed: int, height: int = H, width: int = W, fmt: str = "JPEG") -> bytes:
    """A small textured RGB image written as `fmt`; returns the file's bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + rng.integers(0, 8, (height, width, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, format=fmt)
    return path.read_bytes()


def box_mask(y0: int, y1: int, x0: int, x1: int, height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's iscrowd form: run lengths (background first) in column-major order."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] + runs) if flat[0] else runs}


def read_dataset(out: Path) -> dict[str, shards.RawSample]:
    """Every sample of a converted dataset by key, asserting no key appears twice."""
    samples: dict[str, shards.RawSample] = {}
    for ref in shards.resolve_shards([out]):
        for sample in shards.iter_raw_samples(ref.url):
            assert sample.error is None, sample.error
            assert sample.key not in samples, f"duplicate sample {sample.key}"
            samples[sample.key] = sample
    return samples


def decode(ann: dict) -> np.ndarray:
    seg = ann["segmentation"]
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")}).astype(bool)


def reasons_for(skipped: list[tuple[str, str]], item: str) -> str:
    return " | ".join(reason for name, reason in skipped if name == item)


@pytest.fixture
def coco_dataset(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A COCO instances file over real small images: polygon, compressed RLE, iscrowd RLE, and bad entries."""
    images = tmp_path / "images"
    write_image(images / "a.jpg", 0)
    write_image(images / "sub" / "b.png", 1, fmt="PNG")
    write_image(images / "c.v2.jpg", 2)
    ring = box_mask(10, 40, 20, 60) & ~box_mask(20, 30, 30, 50)
    compressed = mask_utils.encode(np.asfortranarray(ring.astype(np.uint8)))
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "sub/b.png", "width": W, "height": H},
            {"id": 3, "file_name": "c.v2.jpg", "width": W, "height": H},  # no annotations: kept, empty
            {"id": 4, "file_name": "missing.jpg", "width": W, "height": H},
            {"id": 5, "file_name": "../escape.jpg", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "iscrowd": 0, "segmentation": [[5.5, 4, 30, 6.5, 25.2, 30, 8, 22], [40, 30, 60, 30, 50, 45]]},
            {"id": 12, "image_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(box_mask(0, 5, 0, 64) | box_mask(30, 48, 3, 9))},
            {"id": 21, "image_id": 2, "iscrowd": 0, "segmentation": {"size": [H, W], "counts": compressed["counts"].decode()}},
            {"id": 13, "image_id": 1, "iscrowd": 0, "segmentation": [[-20, -20, -10, -20, -10, -10]]},  # off-image: empty
            {"id": 22, "image_id": 2, "iscrowd": 1, "segmentation": uncompressed_rle(box_mask(1, 5, 1, 5, 32, 32))},
            {"id": 99, "image_id": 42, "iscrowd": 0, "segmentation": [[1, 1, 10, 1, 10, 10]]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    for ann in coco["annotations"]:
        ann["category_id"] = 1  # pycocotools' COCO (the test oracle) indexes by category
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(coco))
    return annotations, images, coco


def test_coco_round_trip_matches_pycocotools(coco_dataset, tmp_path):
    annotations, images, coco = coco_dataset
    report = convert_coco(annotations, images, tmp_path / "out", samples_per_shard=10)
    samples = read_dataset(tmp_path / "out")
    assert sorted(samples) == ["a", "c_v2", "sub_b"]

    oracle = COCO(str(annotations))
    expected_ids = {"a": [11, 12], "sub_b": [21], "c_v2": []}
    for key, sample in samples.items():
        record = sa1b.parse_record(sample.members["json"])
        image_id = record["image"]["image_id"]
        assert [a["id"] for a in record["annotations"]] == expected_ids[key]
        for ann in record["annotations"]:
            sa1b.check_annotation(ann, H, W)
            truth = oracle.annToMask(oracle.anns[ann["id"]]).astype(bool)
            assert oracle.anns[ann["id"]]["image_id"] == image_id
            assert truth.any() and np.array_equal(decode(ann), truth), f"{key} ann {ann['id']}"
            assert ann["area"] == truth.sum() and ann["predicted_iou"] == ann["stability_score"] == 1.0
        with Image.open(io.BytesIO(sample.members["jpg"])) as jpeg:
            assert jpeg.format == "JPEG" and jpeg.size == (W, H)
    assert samples["a"].members["jpg"] == (images / "a.jpg").read_bytes()  # JPEG copied byte for byte
    reencoded = np.asarray(Image.open(io.BytesIO(samples["sub_b"].members["jpg"])).convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(images / "sub" / "b.png").convert("RGB"), dtype=np.int16)
    assert np.abs(reencoded - original).mean() < 4

    assert reasons_for(report.skipped, "a.jpg ann 13") == "empty mask"
    assert "does not match" in reasons_for(report.skipped, "sub/b.png ann 22")
    assert "unknown image id 42" in reasons_for(report.skipped, "ann 99")
    assert "missing.jpg" in reasons_for(report.skipped, "missing.jpg")
    assert "outside the images folder" in reasons_for(report.skipped, "../escape.jpg")
    assert len(report.skipped) == 5
    assert not (tmp_path / "escape.jpg").exists() and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".sam-train-job.json", "coco-000000.tar", "manifest.json"
    ]


def make_sa1b_pair(folder: Path, index: int, masks: list[np.ndarray], height: int = H, width: int = W) -> dict:
    """sa_<index>.jpg + sa_<index>.json as SA-1B ships them (indented JSON); returns the record."""
    write_image(folder / f"sa_{index}.jpg", index, height, width)
    annotations = [sa1b.make_annotation(m, ann_id=k) for k, m in enumerate(masks)]
    record = sa1b.make_record(index, f"sa_{index}.jpg", height, width, annotations)
    (folder / f"sa_{index}.json").write_text(json.dumps(record, indent=2))
    return record


def test_sa1b_folder_keeps_good_pairs_and_names_bad_files(tmp_path):
    src = tmp_path / "sa1b"
    records = {
        "sa_1": make_sa1b_pair(src, 1, [box_mask(2, 20, 3, 30), box_mask(20, 40, 10, 50)]),
        "sa_2": make_sa1b_pair(src / "part_b", 2, [box_mask(0, 48, 0, 10)]),
        "sa_3": make_sa1b_pair(src / "part_b", 3, []),
    }
    make_sa1b_pair(src, 4, [box_mask(2, 9, 2, 9)])
    (src / "sa_4.json").write_text('{"image": {"width": 64,')  # cut short
    write_image(src / "sa_5.jpg", 5)  # orphan JPEG
    make_sa1b_pair(src, 6, [box_mask(2, 9, 2, 9, 32, 32)])  # RLE of 32x32 over a 64x48 image
    make_sa1b_pair(src, 7, [box_mask(2, 9, 2, 9)])
    (src / "sa_7.jpg").write_bytes((src / "sa_7.jpg").read_bytes()[:-200])  # truncated download
    make_sa1b_pair(src, 8, [box_mask(2, 9, 2, 9)], height=40)
    write_image(src / "sa_8.jpg", 8)  # the JSON says 64x40, the image is 64x48
    make_sa1b_pair(src, 9, [])
    (src / "sa_9.jpg").write_bytes(b"not an image at all")
    (src / "sa_10.json").write_text("{}")  # orphan JSON

    report = convert_sa1b_folder(src, tmp_path / "out", samples_per_shard=2)
    samples = read_dataset(tmp_path / "out")
    assert sorted(samples) == sorted(records)
    for key, sample in samples.items():
        folder = src if key == "sa_1" else src / "part_b"
        assert sample.members["jpg"] == (folder / f"{key}.jpg").read_bytes()
        assert json.loads(sample.members["json"]) == records[key]
        assert b" " not in sample.members["json"]  # re-serialised compactly

    expected = {
        "sa_4": ["sa_4.json", "malformed JSON"],
        "sa_5": ["sa_5.jpg", "no JSON"],
        "sa_6": ["sa_6.json", "annotation 0", "does not match"],
        "sa_7": ["sa_7.jpg", "truncated"],
        "sa_8": ["sa_8.jpg", "64x48", "64x40"],
        "sa_9": ["sa_9.jpg", "corrupt"],
        "sa_10": ["sa_10.json", "no JPEG"],
    }
    assert sorted(name for name, _ in report.skipped) == sorted(expected)
    for name, words in expected.items():
        reason = reasons_for(report.skipped, name)
        assert all(w in reason for w in words), (name, reason)
    assert report.manifest["total_samples"] == 3


def write_mask_pair(images: Path, masks: Path, stem: str, labels: np.ndarray, mode: str | None = None) -> None:
    write_image(images / f"{stem}.png", len(stem), fmt="PNG")
    masks.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels).save(masks / f"{stem}.png")
    if mode is not None:
        assert Image.open(masks / f"{stem}.png").mode == mode


@pytest.mark.parametrize("dtype,mode,values", [(np.uint8, "L", (1, 2, 7)), (np.uint16, "I;16", (1, 300, 65535))])
def test_mask_folder_instances_round_trip_with_holes(tmp_path, dtype, mode, values):
    images, masks = tmp_path / "images", tmp_path / "masks"
    ring = box_mask(5, 40, 5, 35) & ~box_mask(15, 30, 15, 25)
    instances = {values[0]: ring, values[1]: box_mask(0, 10, 40, 64), values[2]: box_mask(20, 48, 45, 60)}
    labels = np.zeros((H, W), dtype=dtype)
    for value, mask in instances.items():
        labels[mask] = value
    write_mask_pair(images, masks, "scene", labels, mode)
    write_mask_pair(images, masks, "small", np.ones((32, 32), dtype=dtype))  # label smaller than its image
    write_image(images / "unlabelled.jpg", 3)

    report = convert_mask_folder(images, masks, tmp_path / "out", samples_per_shard=4)
    samples = read_dataset(tmp_path / "out")
    assert list(samples) == ["scene"]
    record = sa1b.parse_record(samples["scene"].members["json"])
    decoded = {ann["id"]: decode(ann) for ann in record["annotations"]}
    assert sorted(decoded) == sorted(instances)
    for value, mask in instances.items():
        assert np.array_equal(decoded[value], mask), value
    assert not decoded[values[0]][20, 20], "the ring's hole must stay empty"
    for ann in record["annotations"]:
        sa1b.check_annotation(ann, H, W)
    assert "small.png is 32x32" in reasons_for(report.skipped, "small") and "64x48" in reasons_for(report.skipped, "small")
    assert "unlabelled.jpg: no label PNG" in reasons_for(report.skipped, "unlabelled")
    assert len(report.skipped) == 2


def five_mask_items(tmp_path: Path, broken: str | None = None) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i in range(5):
        labels = np.zeros((H, W), dtype=np.uint8)
        labels[i : i + 20, 2 * i : 2 * i + 30] = i + 1
        write_mask_pair(images, masks, f"img_{i}", labels)
    if broken is not None:
        (images / f"{broken}.png").write_bytes(b"\x89PNG garbage")
    return images, masks


def test_rerun_after_interruption_rewrites_only_the_missing_shard(tmp_path):
    images, masks = five_mask_items(tmp_path)
    out = tmp_path / "out"
    first = convert_mask_folder(images, masks, out, samples_per_shard=2).manifest
    names = [s["name"] for s in first["shards"]]
    assert [s["samples"] for s in first["shards"]] == [2, 2, 1]
    kept = {n: (out / n).stat().st_mtime_ns for n in names[:-1]}
    (out / names[-1]).unlink()  # killed while writing the last shard: its temp file never got renamed
    (out / "manifest.json").unlink()
    (out / f".{names[-1]}.abc123.tmp").write_bytes(b"half a tar")

    second = convert_mask_folder(images, masks, out, samples_per_shard=2).manifest
    assert second["shards"] == first["shards"] and second["total_samples"] == first["total_samples"] == 5
    assert {n: (out / n).stat().st_mtime_ns for n in names[:-1]} == kept, "finished shards must be kept, not rewritten"
    assert sorted(read_dataset(out)) == [f"img_{i}" for i in range(5)]


def test_samples_per_shard_and_manifest_fields(tmp_path):
    images, masks = five_mask_items(tmp_path, broken="img_1")
    out = tmp_path / "out"
    report = convert_mask_folder(images, masks, out, samples_per_shard=2)
    manifest = shards.read_manifest(out)
    assert manifest == report.manifest
    assert manifest["schema_version"] == sa1b.SCHEMA_VERSION and manifest["samples_per_shard"] == 2
    assert manifest["source"] == {"kind": "instance-masks", "images": str(images), "masks": str(masks)}
    # Item i lands in shard i // 2 whatever is skipped, so a rerun maps items to the same shards.
    assert [s["samples"] for s in manifest["shards"]] == [1, 2, 1] and manifest["total_samples"] == 4
    for entry in manifest["shards"]:
        path = out / entry["name"]
        assert entry["name"].startswith("masks-") and entry["name"].endswith(".tar")
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size and entry["samples"] == shards.count_samples(path)
    assert [name for name, _ in report.skipped] == ["img_1"] and "img_1.png: corrupt" in report.skipped[0][1]


def test_cli_converts_coco(coco_dataset, tmp_path):
    annotations, images, _ = coco_dataset
    out = tmp_path / "cli_out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "sam_train.cli", "data", "convert", "coco", str(images), str(out), "--annotations", str(annotations)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert f"3 samples in 1 shards -> {out} (5 skipped)" in result.stdout
    assert "skipped a.jpg ann 13: empty mask" in result.stderr
    assert shards.read_manifest(out)["total_samples"] == 3


def test_resuming_a_different_conversion_into_the_same_folder_is_refused(tmp_path):
    from sam_train.data.shards import write_dataset

    out = tmp_path / "out"
    write_dataset(out, [1, 2, 3], lambda i: (f"k{i}", {"txt": b"x"}), 2, source={"kind": "a"})
    with pytest.raises(ValueError, match="already holds shards of another conversion"):
        write_dataset(out, [1, 2, 3], lambda i: (f"k{i}", {"txt": b"x"}), 3, source={"kind": "a"})


def test_coco_to_shards_to_training_samples_equals_pycocotools(tmp_path):
    # The whole chain: COCO polygons -> our shards -> the training pipeline. With the canvas at
    # the image's own size and masks at stride 1 nothing is resampled, so equality is exact.
    from sam_train.data.pipeline import SampleConfig, collate, decode_sample, expand_batch

    images = tmp_path / "images"
    write_image(images / "p.jpg", seed=1)
    polygon = [[5.0, 5.0, 40.0, 8.0, 30.0, 40.0, 8.0, 30.0]]
    coco = {
        "images": [{"id": 1, "file_name": "p.jpg", "height": H, "width": W}],
        "annotations": [
            {"id": 7, "image_id": 1, "segmentation": polygon, "iscrowd": 0, "category_id": 1},
            {"id": 8, "image_id": 1, "segmentation": uncompressed_rle(box_mask(30, 44, 40, 60)), "iscrowd": 1, "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    convert_coco(tmp_path / "coco.json", images, tmp_path / "out", samples_per_shard=4)
    (raw,) = read_dataset(tmp_path / "out").values()
    cfg = SampleConfig(image_size=W, mask_stride=1, min_mask_area=0, max_masks=10)
    sample = decode_sample(raw, cfg, np.random.default_rng(0))
    oracle = COCO(str(tmp_path / "coco.json"))
    truth = np.stack([oracle.annToMask(oracle.anns[i]).astype(bool) for i in (7, 8)])
    canvas = np.zeros((2, W, W), dtype=bool)
    canvas[:, :H, :W] = truth
    assert np.array_equal(expand_batch(collate([sample]), W)["masks"].numpy(), canvas)
