"""Per-sample CPU cost of our sample pipeline on an SA-1B-sized sample, against a floor and a naive loader.

One core, one process, the same sample for all three:
  floor  a bare full-size PIL decode of the JPEG (no masks at all)
  naive  full-size JPEG decode + every RLE decoded at full size with pycocotools, then resized
  ours   sam_train.data.pipeline.decode_sample, the DataLoader worker's whole job: DCT-scaled
         JPEG decode of the shown region, filter/sample masks from JSON fields, decode only the K
         kept RLEs to runs. Resizing onto the canvas and rasterising the masks happen after the
         batch reaches the training device (DataModule.on_after_batch_transfer, `expand_batch`);
         that step is timed too, on this CPU, for reference

The sample is `tests/assets/cars.jpg` (2250 x 1500) when present, else a synthetic image of
that size, with 100 masks of wobbly outline. Output: image 1024 x 1024 canvas; masks at the loss
resolution, 256 x 256 (image_size / mask_stride 4, the decoder's low-res logits).

    python scripts/bench_data.py --repeats 20
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from sam_train.data.pipeline import SampleConfig, collate, decode_sample, expand_batch
from sam_train.data.sa1b import make_annotation, make_record
from sam_train.data.shards import RawSample

PHOTO = Path(__file__).resolve().parents[1] / "tests" / "assets" / "cars.jpg"


def wobbly_masks(rng: np.random.Generator, height: int, width: int, count: int) -> list[np.ndarray]:
    """Star-shaped blobs with irregular outlines, sized like SA-1B masks (from small parts to large objects)."""
    masks = []
    for _ in range(count):
        radius = float(np.exp(rng.uniform(np.log(15), np.log(450))))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        y0, y1 = int(max(cy - 2 * radius, 0)), int(min(cy + 2 * radius, height))
        x0, x1 = int(max(cx - 2 * radius, 0)), int(min(cx + 2 * radius, width))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        angle = np.arctan2(yy - cy, xx - cx)
        outline = radius * (1 + sum(rng.uniform(0, 0.15) * np.sin(k * angle + rng.uniform(0, 6)) for k in (2, 3, 5, 8, 13)))
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = np.hypot(yy - cy, xx - cx) <= outline
        if mask.any():
            masks.append(mask)
    return masks


def build_sample(seed: int) -> tuple[RawSample, str]:
    if PHOTO.is_file():
        data, source = PHOTO.read_bytes(), str(PHOTO)
        height, width = Image.open(io.BytesIO(data)).size[::-1]
    else:
        height, width = 1500, 2250
        image = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        data, source = buffer.getvalue(), "synthetic 2250x1500 (photo absent)"
    masks = wobbly_masks(np.random.default_rng(seed), height, width, 100)
    record = make_record(0, "sa_0.jpg", height, width, [make_annotation(m, i) for i, m in enumerate(masks)])
    return RawSample("bench.tar", "sa_0", {"jpg": data, "json": json.dumps(record).encode()}), source


def floor(raw: RawSample) -> None:
    Image.open(io.BytesIO(raw.members["jpg"])).load()


def naive(raw: RawSample, cfg: SampleConfig) -> None:
    """What an extract-and-decode-everything loader does."""
    image = Image.open(io.BytesIO(raw.members["jpg"])).convert("RGB")
    record = json.loads(raw.members["json"])
    h, w = record["image"]["height"], record["image"]["width"]
    scale = cfg.image_size / max(h, w)
    image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    size = (round(w * scale / cfg.mask_stride), round(h * scale / cfg.mask_stride))
    for ann in record["annotations"]:
        rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        Image.fromarray(mask_utils.decode(rle)).resize(size, Image.NEAREST)


def interleaved_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin so drifting machine load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says

    raw, source = build_sample(args.seed)
    cfg = SampleConfig(image_size=1024, mask_stride=4, max_masks=64)
    rng = np.random.default_rng(args.seed)
    sample = decode_sample(raw, cfg, rng)
    kept = len(expand_batch(collate([sample]), cfg.image_size)["masks"])
    print(f"sample: {source}, 100 masks; K={cfg.max_masks}; image out {cfg.image_size}px canvas, "
          f"masks out {cfg.mask_size}x{cfg.mask_size} (loss resolution); ours kept {kept} masks")

    # Floor and ours alternate, so drifting machine load hits both alike; naive runs on its own
    # (interleaving its 100 full-size masks would evict the others' caches and flatter it).
    times = interleaved_times({"floor": lambda: floor(raw), "ours": lambda: decode_sample(raw, cfg, rng)}, args.repeats)
    times |= interleaved_times({"naive": lambda: naive(raw, cfg)}, max(3, args.repeats // 4))
    batch = collate([sample])
    times |= interleaved_times({"raster": lambda: expand_batch(dict(batch), cfg.image_size)}, args.repeats)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}  # the least disturbed run on a shared machine

    print(f"{'ms/sample':28}{'median':>10}{'best':>10}")
    rows = [("floor (bare JPEG decode)", "floor"), ("naive (decode all, resize)", "naive"), ("ours (data worker)", "ours"),
            ("  + expand, if on CPU", "raster")]
    for label, name in rows:
        print(f"{label:28}{1000 * median[name]:10.1f}{1000 * best[name]:10.1f}")
    print("(expand = resize onto the canvas + rasterise masks, on the training device after transfer;\n"
          " its CPU cost matters only to CPU-only training)")
    print(f"ours / floor = {median['ours'] / median['floor']:.2f}x median, {best['ours'] / best['floor']:.2f}x best "
          f"(target <= 1.3x); naive / ours = {median['naive'] / median['ours']:.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
