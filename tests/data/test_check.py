"""`data check` finds every kind of bad sample (one exact line each) and never writes; `data show` draws."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam_train.data import rle
from sam_train.data.check import check_shards, show_sample
from sam_train.data.errors import SampleError
from sam_train.data.shards import MANIFEST, write_shard
from sam_train.data.synth import synth_dataset, synth_sample

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 synthetic samples in 2 shards + manifest."""
    out = tmp_path_factory.mktemp("check") / "ds"
    synth_dataset(out, images=6, seed=0, samples_per_shard=3, workers=1)
    return out


def run_check(*sources: Path) -> tuple[list[str], list[str], object]:
    """(problem lines, all printed lines, summary) of checking `sources`."""
    lines: list[str] = []
    summary = check_shards([str(s) for s in sources], out=lines.append)
    return lines[:-1], lines, summary


def good(index: int = 0) -> tuple[str, dict, dict[str, bytes]]:
    """(key, parsed record, members) of a valid small sample."""
    key, members = synth_sample(1, index, short_side=(48, 64))
    return key, json.loads(members["json"]), members


def shard_with_record(tmp_path: Path, mutate) -> tuple[Path, str, dict]:
    """A one-sample shard whose JSON record was changed by `mutate(record)`; returns (shard, key, original record)."""
    key, record, members = good()
    original = json.loads(json.dumps(record))
    mutate(record)
    path = tmp_path / "bad.tar"
    write_shard(path, [(key, {**members, "json": json.dumps(record).encode()})])
    return path, key, original


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these member names, unsafe ones included (webdataset's writer would refuse)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def assert_only(lines: list[str], expected: str, summary) -> None:
    assert lines == [expected]
    assert summary.bad == 1


# --- good data -------------------------------------------------------------------------------


def test_clean_dataset_has_no_bad_lines(dataset):
    problems, lines, summary = run_check(dataset)
    assert problems == []
    assert lines == ["checked 6 samples in 2 shards: 0 bad"]
    assert (summary.shards, summary.samples, summary.bad) == (2, 6, 0)


def test_folder_of_raw_tars_and_single_tar_are_accepted(dataset, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for tar in dataset.glob("*.tar"):
        shutil.copy(tar, raw)
    _, lines, summary = run_check(raw)
    assert lines == ["checked 6 samples in 2 shards: 0 bad"]
    _, lines, _ = run_check(raw / "synth-000001.tar")
    assert lines == ["checked 3 samples in 1 shards: 0 bad"]


# --- one test per bad kind -------------------------------------------------------------------


def test_truncated_jpeg(tmp_path):
    key, _, members = good()
    path = tmp_path / "bad.tar"
    write_shard(path, [(key, {**members, "jpg": members["jpg"][: len(members["jpg"]) // 2]})])
    problems, _, summary = run_check(path)
    assert len(problems) == 1 and summary.bad == 1
    assert problems[0].startswith(f"{path} {key}: corrupt JPEG: image file is truncated")


def test_garbage_jpeg(tmp_path):
    key, _, members = good()
    path = tmp_path / "bad.tar"
    write_shard(path, [(key, {**members, "jpg": b"not an image at all"})])
    problems, _, summary = run_check(path)
    assert_only(problems, f"{path} {key}: corrupt JPEG: not a decodable image", summary)


def test_malformed_json(tmp_path):
    key, _, members = good()
    path = tmp_path / "bad.tar"
    write_shard(path, [(key, {**members, "json": b'{"image": {'})])
    problems, _, summary = run_check(path)
    assert len(problems) == 1 and summary.bad == 1
    assert problems[0].startswith(f"{path} {key}: malformed JSON (")


def test_json_without_annotations(tmp_path):
    path, key, _ = shard_with_record(tmp_path, lambda r: r.pop("annotations"))
    problems, _, summary = run_check(path)
    assert_only(problems, f"{path} {key}: JSON has no 'annotations' list", summary)


def test_rle_size_not_matching_image(tmp_path):
    def grow(record):
        record["annotations"][0]["segmentation"]["size"][0] += 1

    path, key, record = shard_with_record(tmp_path, grow)
    h, w = record["image"]["height"], record["image"]["width"]
    problems, _, summary = run_check(path)
    reason = f"annotation 0 (id 0): RLE size {h + 1}x{w} does not match the image's {h}x{w}"
    assert_only(problems, f"{path} {key}: {reason}", summary)


def test_area_inconsistent(tmp_path):
    def inflate(record):
        record["annotations"][1]["area"] += 5

    path, key, record = shard_with_record(tmp_path, inflate)
    area = record["annotations"][1]["area"]
    problems, _, summary = run_check(path)
    assert_only(problems, f"{path} {key}: annotation 1 (id 1): area {area + 5} but the mask has {area} pixels", summary)


def test_every_bad_annotation_is_counted_on_one_line(tmp_path):
    def inflate(record):
        for ann in record["annotations"]:
            ann["area"] += 1

    path, key, record = shard_with_record(tmp_path, inflate)
    anns = record["annotations"]
    assert len(anns) > 3
    first = "; ".join(
        f"annotation {i} (id {i}): area {a['area'] + 1} but the mask has {a['area']} pixels" for i, a in enumerate(anns[:3])
    )
    problems, _, summary = run_check(path)
    assert_only(problems, f"{path} {key}: {first} ({len(anns)} of {len(anns)} annotations bad)", summary)


def test_bbox_inconsistent(tmp_path):
    def shift(record):
        record["annotations"][0]["bbox"][0] += 5

    path, key, record = shard_with_record(tmp_path, shift)
    bbox = record["annotations"][0]["bbox"]
    shifted = [bbox[0] + 5, *bbox[1:]]
    problems, _, summary = run_check(path)
    assert_only(problems, f"{path} {key}: annotation 0 (id 0): bbox {shifted} but the mask spans {bbox}", summary)


def test_empty_mask(tmp_path):
    def empty(record):
        h, w = record["image"]["height"], record["image"]["width"]
        record["annotations"][2].update(segmentation=rle.encode(np.zeros((h, w), dtype=bool)), area=0)

    path, key, _ = shard_with_record(tmp_path, empty)
    problems, _, summary = run_check(path)
    assert_only(problems, f"{path} {key}: annotation 2 (id 2): empty mask", summary)


def test_json_image_size_differs_from_jpeg(tmp_path):
    key, record, members = good()
    h, w = record["image"]["height"], record["image"]["width"]
    narrower = io.BytesIO()
    Image.open(io.BytesIO(members["jpg"])).crop((0, 0, w - 1, h)).save(narrower, format="JPEG")
    path = tmp_path / "bad.tar"
    write_shard(path, [(key, {**members, "jpg": narrower.getvalue()})])
    problems, _, summary = run_check(path)
    assert_only(problems, f"{path} {key}: JSON image is {h}x{w} but the JPEG decodes to {h}x{w - 1} (HxW)", summary)


def test_missing_json_member(tmp_path):
    key, _, members = good()
    other, _, other_members = good(1)
    path = tmp_path / "bad.tar"
    write_shard(path, [(key, {"jpg": members["jpg"]}), (other, other_members)])
    problems, lines, summary = run_check(path)
    assert_only(problems, f"{path} {key}: missing json member", summary)
    assert lines[-1] == "checked 2 samples in 1 shards: 1 bad"


@pytest.mark.parametrize(
    "name, key, reason",
    [
        ("../evil.jpg", "../evil", "member path '../evil.jpg' climbs out of the archive with '..'"),
        ("sub/../x.json", "sub/../x", "member path 'sub/../x.json' climbs out of the archive with '..'"),
        ("/abs.json", "abs", "member path '/abs.json' is absolute"),
    ],
)
def test_unsafe_member_paths(tmp_path, name, key, reason):
    good_key, _, members = good()
    tar_members = [(f"{good_key}.jpg", members["jpg"]), (f"{good_key}.json", members["json"]), (name, b"{}")]
    path = write_tar(tmp_path / "bad.tar", tar_members)
    problems, lines, summary = run_check(path)
    assert_only(problems, f"{path} {key}: {reason}", summary)
    assert lines[-1] == "checked 2 samples in 1 shards: 1 bad"


def test_duplicate_key_across_shards(tmp_path):
    key, _, members = good()
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(first, [(key, members)])
    write_shard(second, [(key, members)])
    problems, _, summary = run_check(tmp_path)
    assert_only(problems, f"{second} {key}: duplicate key (also in {first})", summary)


def test_non_adjacent_members_is_one_shard_line_naming_the_fix(tmp_path):
    (a, _, ma), (b, _, mb) = good(0), good(1)
    path = write_tar(
        tmp_path / "bad.tar",
        [(f"{a}.jpg", ma["jpg"]), (f"{b}.jpg", mb["jpg"]), (f"{a}.json", ma["json"]), (f"{b}.json", mb["json"])],
    )
    problems, _, summary = run_check(path)
    assert len(problems) == 1 and summary.bad == 1, problems  # no spurious "missing json member" lines
    assert problems[0].startswith(f"{path} -: members of sample {a!r} are not adjacent")
    assert "sam-train data convert" in problems[0]


def test_truncated_tar_is_reported_and_the_next_shard_still_checked(dataset, tmp_path):
    data = (dataset / "synth-000000.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    shutil.copy(dataset / "synth-000001.tar", tmp_path / "b.tar")
    problems, lines, summary = run_check(tmp_path)
    assert problems == [f"{tmp_path / 'a.tar'} -: unreadable tar (unexpected end of data)"]
    assert lines[-1] == "checked 3 samples in 2 shards: 1 bad"
    assert summary.bad == 1


def test_truncated_shard_of_a_dataset_fails_its_manifest(dataset, tmp_path):
    copy = shutil.copytree(dataset, tmp_path / "ds")
    shard = copy / "synth-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    problems, _, summary = run_check(copy)
    assert problems[0].startswith(f"{shard} -: sha256 ")
    assert problems[1] == f"{shard} -: bytes {len(data) // 2} but manifest.json says {len(data)} (changed after writing?)"
    assert problems[-1].startswith(f"{shard} -: unreadable tar after ")
    assert summary.bad == len(problems) == 3


def test_manifest_sample_count_is_verified(dataset, tmp_path):
    copy = shutil.copytree(dataset, tmp_path / "ds")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["shards"][1]["samples"] = 4
    (copy / MANIFEST).write_text(json.dumps(manifest))
    problems, _, summary = run_check(copy)
    assert_only(problems, f"{copy / 'synth-000001.tar'} -: holds 3 samples but manifest.json says 4", summary)


# --- the check is read-only ------------------------------------------------------------------


def test_check_never_writes_or_extracts(tmp_path, monkeypatch):
    key, _, members = good()
    shards = tmp_path / "shards"
    shards.mkdir()
    path = write_tar(shards / "evil.tar", [(f"{key}.jpg", members["jpg"]), ("../evil.jpg", b"x"), ("/abs.json", b"{}")])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = sorted(tmp_path.rglob("*"))
    problems, _, _ = run_check(path)
    assert len(problems) == 3
    assert sorted(tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()
    assert list(cwd.iterdir()) == []


# --- show -----------------------------------------------------------------------------------


def test_show_draws_masks_over_the_image(dataset, tmp_path):
    key = "synth_0_00000004"
    out = show_sample(dataset / "synth-000001.tar", key, tmp_path / "sub" / "show.png")
    drawn = np.asarray(Image.open(out))
    assert synth_sample(0, 4)[0] == key
    members = synth_sample(0, 4)[1]
    plain = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
    record = json.loads(members["json"])
    assert drawn.shape == plain.shape == (record["image"]["height"], record["image"]["width"], 3)
    seg = record["annotations"][0]["segmentation"]
    mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
    inside = np.abs(drawn[mask].astype(int) - plain[mask].astype(int)).mean()
    assert inside > 20, "mask pixels must be tinted"
    assert [p.name for p in out.parent.iterdir()] == ["show.png"], "written atomically: no temp file left"


def test_show_unknown_key_names_shard_and_key(dataset, tmp_path):
    shard = dataset / "synth-000000.tar"
    with pytest.raises(KeyError, match="no_such_key") as info:
        show_sample(shard, "no_such_key", tmp_path / "x.png")
    assert str(shard) in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_show_bad_sample_says_why(tmp_path):
    key, _, members = good()
    path = tmp_path / "bad.tar"
    write_shard(path, [(key, {"jpg": members["jpg"]})])
    with pytest.raises(SampleError, match=f"{key}: missing json member"):
        show_sample(path, key, tmp_path / "x.png")


# --- the command line -----------------------------------------------------------------------


def sam_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "sam_train.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
def test_cli_check_exit_codes_and_show(dataset, tmp_path):
    result = sam_train("data", "check", str(dataset), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "checked 6 samples in 2 shards: 0 bad\n"

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(dataset / "synth-000000.tar", bad)
    key, _, members = good()
    write_shard(bad / "z.tar", [(key, {"jpg": members["jpg"]})])
    result = sam_train("data", "check", str(bad), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"{bad / 'z.tar'} {key}: missing json member",
        "checked 4 samples in 2 shards: 1 bad",
    ]

    out = tmp_path / "x.png"
    shard = str(dataset / "synth-000000.tar")
    result = sam_train("data", "show", shard, "--key", "synth_0_00000001", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and f"wrote {out}" in result.stdout
