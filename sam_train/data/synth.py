"""`sam-train data synth`: the built-in SA-1B-style dataset (quick start, tests, demos).

Image i of seed s is drawn from its own generator `default_rng([s, i])`, so the dataset is the
same whatever the shard size or number of worker processes.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from sam_train.data.sa1b import make_annotation, make_record
from sam_train.data.shards import write_dataset
from sam_train.data.synthetic import SCENE_STYLES

# Simulated model-quality scores: a real SA-1B file carries the auto-labeller's predicted IoU and
# stability score per mask. Ours are drawn from these ranges so threshold filters have work to do.
PREDICTED_IOU_RANGE = (0.80, 1.0)
STABILITY_RANGE = (0.85, 1.0)


def synth_sample(
    seed: int, index: int, short_side: tuple[int, int] = (240, 400), style: str = "objects"
) -> tuple[str, dict[str, bytes]]:
    """(key, {"jpg", "json"}) of synthetic image `index` of a scene style: a non-square image of random size and its masks."""
    if style not in SCENE_STYLES:
        raise ValueError(f"unknown scene style {style!r}; choose from {sorted(SCENE_STYLES)}")
    rng = np.random.default_rng([seed, index])
    short = int(rng.integers(short_side[0], short_side[1] + 1))
    long = int(short * rng.uniform(1.0, 1.8))
    height, width = (short, long) if rng.random() < 0.7 else (long, short)  # mostly landscape, as SA-1B
    scene = SCENE_STYLES[style](rng, height, width)
    key = f"{'synth' if style == 'objects' else style}_{seed}_{index:08d}"
    annotations = [
        make_annotation(
            mask,
            ann_id=k,
            predicted_iou=rng.uniform(*PREDICTED_IOU_RANGE),
            stability_score=rng.uniform(*STABILITY_RANGE),
        )
        for k, mask in enumerate(scene.masks)
    ]
    record = make_record(index, f"{key}.jpg", height, width, annotations)
    jpeg = io.BytesIO()
    Image.fromarray(scene.image).save(jpeg, format="JPEG", quality=90)
    return key, {"jpg": jpeg.getvalue(), "json": json.dumps(record, separators=(",", ":")).encode()}


def _synth_item(item: tuple[int, int, str]) -> tuple[str, dict[str, bytes]]:
    seed, index, style = item
    return synth_sample(seed, index, style=style)


def synth_dataset(
    out_dir: str | os.PathLike, images: int, seed: int, samples_per_shard: int = 100, workers: int = 0,
    style: str = "objects",
) -> dict:
    """Write `images` synthetic samples of a scene style as shards + manifest into `out_dir`; returns the manifest.

    Samples are drawn in `workers` processes (0 = one per CPU core); shards are written in order
    by this process, so an interrupted run resumes at the first missing shard.
    """
    if style not in SCENE_STYLES:
        raise ValueError(f"unknown scene style {style!r}; choose from {sorted(SCENE_STYLES)}")
    items = [(seed, i, style) for i in range(images)]
    source = {"kind": "synthetic", "seed": seed, "images": images}
    if style != "objects":  # the default goes unnamed: a manifest without a style is an "objects" dataset
        source["style"] = style
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return write_dataset(out_dir, items, _synth_item, samples_per_shard, source, prefix="synth")
    with ProcessPoolExecutor(workers) as pool:
        chunksize = max(1, samples_per_shard // (4 * workers))
        return write_dataset(
            out_dir, items, _synth_item, samples_per_shard, source, prefix="synth",
            map_fn=lambda fn, chunk: pool.map(fn, chunk, chunksize=chunksize),
        )
