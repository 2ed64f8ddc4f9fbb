"""Throughput of `sam-train data synth` (target: >= 50 images/s on this project's 2-core machine).

Writes the same dataset with 1 worker and with one per core, in one process, and prints
images/s for each, the parallel speed-up and the ratio to the target.

    python scripts/bench_synth.py --images 400
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from sam_train.data.synth import synth_dataset

TARGET = 50.0  # images/s


def images_per_second(images: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        synth_dataset(out, images=images, seed=0, samples_per_shard=100, workers=workers)
        return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    one = images_per_second(args.images, 1)
    all_cores = images_per_second(args.images, cores)
    print(f"{args.images} images, seed 0")
    print(f"{'1 worker':16}{one:8.1f} images/s")
    print(f"{f'{cores} workers':16}{all_cores:8.1f} images/s  ({all_cores / one:.2f}x of 1 worker)")
    print(f"{cores} workers / target {TARGET:.0f} images/s = {all_cores / TARGET:.2f}x")


if __name__ == "__main__":
    main()
