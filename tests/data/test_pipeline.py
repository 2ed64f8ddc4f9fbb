"""Sample pipeline: masks decoded on the loss grid equal pycocotools, geometry stays aligned, bad input is named."""

from __future__ import annotations

import io
import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from sam_train.data.datamodule import SA1BDataModule, collate_stream, decode_for_stream
from sam_train.data.errors import SampleError
from sam_train.data.iteration import ShardStream
from sam_train.data.pipeline import SampleConfig, TrainSample, collate, decode_sample, expand_batch, sample_rng
from sam_train.data.sa1b import make_annotation, make_record
from sam_train.data.shards import RawSample, iter_raw_samples, resolve_shards, write_shard
from tests.conftest import load_test_photo


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def raw_sample(image: np.ndarray, masks: list[np.ndarray], key: str = "k", **ann_kwargs) -> RawSample:
    h, w = image.shape[:2]
    record = make_record(0, f"{key}.jpg", h, w, [make_annotation(m, i, **ann_kwargs) for i, m in enumerate(masks)])
    return RawSample("shard.tar", key, {"jpg": jpeg(image), "json": json.dumps(record).encode()})


def expanded(sample: TrainSample, image_size: int) -> dict:
    """The sample as the training step receives it: collated, then expanded on the device."""
    return expand_batch(collate([sample]), image_size)


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 <= 1


def test_masks_equal_pycocotools_sampled_on_the_loss_grid(synth_24):
    cfg = SampleConfig(image_size=128, mask_stride=4, max_masks=1000, min_mask_area=0)
    raw = next(iter_raw_samples(resolve_shards([str(synth_24)])[0].url))
    sample = decode_sample(raw, cfg, sample_rng(0, 0, raw.key))
    record = json.loads(raw.members["json"])
    h, w = record["image"]["height"], record["image"]["width"]
    scale = 128 / max(h, w)
    centres = (np.arange(32) + 0.5) * 4
    rows = np.floor(centres / scale).astype(int)
    cols = np.floor(centres / scale).astype(int)
    expected = []
    for ann in record["annotations"]:
        full = mask_utils.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
        grid = np.zeros((32, 32), dtype=bool)
        r_ok, c_ok = (centres < h * scale + 0.5) & (rows < h), (centres < w * scale + 0.5) & (cols < w)
        grid[np.ix_(r_ok, c_ok)] = full[np.ix_(rows[r_ok], cols[c_ok])].astype(bool)
        if grid.any():
            expected.append(grid)
    batch = expanded(sample, 128)
    assert batch["masks"].shape == (len(expected), 32, 32)
    assert torch.equal(batch["masks"], torch.from_numpy(np.stack(expected)))
    image = batch["images"][0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
    assert sample.content_size == (round(h * scale), round(w * scale))
    assert image[:, sample.content_size[0]:, :].sum() == 0, "padding is zero, bottom/right"


@pytest.mark.parametrize("seed", range(6))
def test_image_and_masks_stay_aligned_under_jitter_and_flip(seed):
    # The image *is* its mask (white object on black): after any placement, the canvas pixel at
    # each mask-grid centre must be white exactly where the decoded mask is set.
    h, w = 300, 420
    masks = [ellipse(h, w, 150, 200, 80, 150), ellipse(h, w, 60, 330, 50, 60)]
    image = np.repeat((np.logical_or(*masks) * 255).astype(np.uint8)[..., None], 3, axis=2)
    cfg = SampleConfig(image_size=128, mask_stride=2, min_mask_area=0, jitter_scale=(0.3, 2.0), hflip_prob=0.5)
    raw = raw_sample(image, masks)
    sample = decode_sample(raw, cfg, np.random.default_rng(seed))
    batch = expanded(sample, 128)
    union = batch["masks"].any(0).numpy()
    centres = (np.arange(64) * 2 + 1)
    bright = batch["images"][0, 0].numpy()[np.ix_(centres, centres)] > 127
    assert union.sum() > 20
    agreement = (union == bright).mean()
    assert agreement > 0.97, f"mask and image disagree on {1 - agreement:.1%} of the grid"


def test_flip_mirrors_content():
    h, w = 100, 200
    mask = np.zeros((h, w), bool)
    mask[20:80, 10:60] = True  # left side
    image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    cfg = SampleConfig(image_size=64, mask_stride=1, min_mask_area=0, hflip_prob=1.0)
    sample = decode_sample(raw_sample(image, [mask]), cfg, np.random.default_rng(0))
    batch = expanded(sample, 64)
    cols = np.flatnonzero(batch["masks"][0].any(0).numpy())
    image_cols = np.flatnonzero((batch["images"][0, 0] > 127).any(0).numpy())
    assert image_cols.min() > 40, "the image is mirrored with its masks"
    assert cols.min() > 40 and cols.max() < 64, "a left-side object lands on the right after the flip"


def test_filters_run_on_json_fields_and_k_caps_the_count():
    h, w = 200, 200
    huge = np.ones((h, w), bool)
    huge[:5] = False  # 97.5% of the image
    tiny = np.zeros((h, w), bool)
    tiny[0:2, 0:2] = True
    normal = [ellipse(h, w, 40 + 30 * i % 120, 50 + 25 * i % 100, 15, 15) for i in range(6)]
    image = np.full((h, w, 3), 128, np.uint8)
    cfg = SampleConfig(image_size=128, mask_stride=4, max_masks=4, min_mask_area=16)
    sample = decode_sample(raw_sample(image, [huge, tiny, *normal]), cfg, np.random.default_rng(0))
    assert expanded(sample, 128)["masks"].shape[0] == 4
    low_quality = SampleConfig(image_size=128, mask_stride=4, min_predicted_iou=0.9)
    assert decode_sample(raw_sample(image, normal, predicted_iou=0.5), low_quality, np.random.default_rng(0)) is None


def _bad(raw: RawSample, **changes) -> RawSample:
    record = json.loads(raw.members["json"])
    for path, value in changes.items():
        target = record
        *parents, leaf = path.split(".")
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        target[leaf] = value
    return RawSample(raw.shard, raw.key, {**raw.members, "json": json.dumps(record).encode()})


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda r: RawSample(r.shard, r.key, {**r.members, "jpg": r.members["jpg"][:300]}), "corrupt JPEG"),
        (lambda r: RawSample(r.shard, r.key, {**r.members, "json": b"{not json"}), "malformed JSON"),
        (lambda r: RawSample(r.shard, r.key, {"jpg": r.members["jpg"]}), "no .json member"),
        (lambda r: _bad(r, **{"annotations.0.segmentation": {"size": [10, 10], "counts": "PP"}}), "RLE size 10x10 does not match"),
        (lambda r: _bad(r, **{"image.width": 99}), "JPEG is 120x80 but its JSON says 99x80"),
        (lambda r: RawSample(r.shard, r.key, dict(r.members), error="member path '../x.jpg' climbs out"), "climbs out"),
    ],
)
def test_bad_input_names_shard_key_and_reason(make, reason):
    image = np.full((80, 120, 3), 90, np.uint8)
    raw = make(raw_sample(image, [ellipse(80, 120, 40, 60, 20, 30)], key="sa_7"))
    with pytest.raises(SampleError) as info:
        decode_sample(raw, SampleConfig(image_size=64), np.random.default_rng(0))
    assert info.value.shard == "shard.tar" and info.value.key == "sa_7"
    assert reason in info.value.reason


def test_large_jpeg_is_decoded_at_reduced_scale_like_a_full_decode():
    photo = load_test_photo("cars.jpg")  # 2250 x 1500, SA-1B size
    h, w = photo.shape[:2]
    cfg = SampleConfig(image_size=256, mask_stride=4, min_mask_area=0)
    sample = decode_sample(raw_sample(photo, [ellipse(h, w, 700, 1000, 300, 500)]), cfg, np.random.default_rng(0))
    assert sample.pixels.shape[0] < h // 2, "the worker decoded at a reduced DCT scale"
    reference = np.asarray(Image.fromarray(photo).resize((256, 171), Image.BILINEAR)).astype(np.float32)
    ours = expanded(sample, 256)["images"][0, :, :171, :256].permute(1, 2, 0).numpy().astype(np.float32)
    assert np.abs(ours - reference).mean() < 4.0


def test_batch_runs_the_encoder_once_per_image_and_the_decoder_over_all_masks():
    image = np.full((80, 120, 3), 90, np.uint8)
    samples = [
        decode_sample(raw_sample(image, [ellipse(80, 120, 40, 60, 20, 30)] * n, key=f"s{n}"), SampleConfig(image_size=64), np.random.default_rng(0))
        for n in (1, 3)
    ]
    batch = expand_batch(collate(samples), 64)
    assert batch["images"].shape == (2, 3, 64, 64)
    assert batch["masks"].shape == (4, 16, 16)
    assert batch["image_index"].tolist() == [0, 1, 1, 1]
    assert batch["content_sizes"].tolist() == [[43, 64], [43, 64]]
    assert torch.equal(batch["masks"][0], batch["masks"][3]), "the same mask rasterises the same in any image"
    assert not any(k.startswith(("mask_", "grid_", "pixel")) for k in batch), "the compact form is consumed"


def _shard_with_one_bad_sample(tmp_path):
    image = np.full((80, 120, 3), 90, np.uint8)
    good = [raw_sample(image, [ellipse(80, 120, 40, 60, 20, 30)], key=f"good{i}") for i in range(3)]
    bad = RawSample("", "broken", {"jpg": b"\xff\xd8 not a jpeg", "json": good[0].members["json"]})
    path = tmp_path / "mixed.tar"
    write_shard(path, [(r.key, r.members) for r in (good[0], bad, good[1], good[2])])
    return path


def test_training_stream_skips_counts_and_logs_bad_samples(tmp_path):
    path = _shard_with_one_bad_sample(tmp_path)
    log_path = tmp_path / "run" / "bad_samples.jsonl"
    dm = SA1BDataModule([str(path)], image_size=64, batch_size=2, num_workers=0, pin_memory=False, bad_samples_log=str(log_path))
    keys = [key for batch in dm.train_dataloader() for key in dm.on_before_batch_transfer(batch, 0)["keys"]]
    assert len(keys) == 4 and "broken" not in keys, "the bad sample is replaced, so the step count is unchanged"
    assert dm.bad_samples == 1
    (record,) = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert record["shard"] == str(path) and record["key"] == "broken" and "corrupt JPEG" in record["reason"]


def test_strict_mode_raises_on_the_bad_sample(tmp_path):
    path = _shard_with_one_bad_sample(tmp_path)
    stream = ShardStream(resolve_shards([str(path)]), partial(decode_for_stream, SampleConfig(image_size=64), 0), 2, strict=True)
    with pytest.raises(SampleError, match="broken: corrupt JPEG"):
        list(DataLoader(stream, batch_size=2, collate_fn=collate_stream))


def test_a_truncated_shard_costs_its_lost_samples_not_the_run(tmp_path):
    image = np.full((80, 120, 3), 90, np.uint8)
    raws = [raw_sample(image, [ellipse(80, 120, 40, 60, 20, 30)], key=f"s{i}") for i in range(6)]
    path = tmp_path / "cut.tar"
    write_shard(path, [(r.key, r.members) for r in raws])
    manifest_count = 6
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a copy that died half-way
    from sam_train.data.shards import ShardRef

    stream = ShardStream([ShardRef(str(path), manifest_count)], partial(decode_for_stream, SampleConfig(image_size=64), 0), 2)
    items = list(stream)
    assert len(items) == 6, "the rank still yields the count its peers expect"
    lost = [record for _, records in items for record in records]
    assert len(lost) >= 2 and all(str(path) == r["shard"] for r in lost)
    assert all("unreadable from here on" in r["reason"] or "ends before" in r["reason"] for r in lost)
