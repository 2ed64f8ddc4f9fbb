"""Predictor latency, ours vs Meta's segment-anything, same weights, same process, same photo.

Prints the image-encode time (once per image) and the per-click decode time (one point -> 3
masks) for both, and our/Meta ratios. Meta's package is a dev dependency (`pip install -e .[dev]`).

    python scripts/bench_predictor.py --model vit_b --repeats 3 --clicks 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segment_anything import SamPredictor as MetaPredictor
from segment_anything import sam_model_registry

from sam_train.model import build_sam, export_official
from sam_train.predictor import SamPredictor

DEFAULT_PHOTO = Path(__file__).resolve().parents[1] / "tests" / "assets" / "dog.jpg"


def time_predictor(predictor, image: np.ndarray, repeats: int, clicks: int, seed: int) -> tuple[float, float]:
    """Median seconds of set_image and of one single-point predict."""
    rng = np.random.default_rng(seed)
    encode, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.set_image(image)
        encode.append(time.perf_counter() - start)
        for _ in range(clicks):
            point = rng.uniform([0, 0], [image.shape[1], image.shape[0]])[None]
            start = time.perf_counter()
            predictor.predict(point_coords=point, point_labels=np.array([1]))
            decode.append(time.perf_counter() - start)
    return statistics.median(encode), statistics.median(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    if args.photo.is_file():
        image = np.asarray(Image.open(args.photo).convert("RGB"))
    else:
        image = np.random.default_rng(0).integers(0, 256, size=(534, 800, 3), dtype=np.uint8)
        print(f"{args.photo} not found: using random pixels")
    ours = build_sam(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        meta = sam_model_registry[args.model](checkpoint=str(export_official(ours, Path(tmp) / "w.pth")))
    predictors = {"sam-train": SamPredictor(ours.to(args.device)), "segment-anything": MetaPredictor(meta.to(args.device))}

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} on {device}, image {image.shape[1]}x{image.shape[0]}, {args.repeats} images x {args.clicks} clicks")
    results = {name: time_predictor(p, image, args.repeats, args.clicks, seed=0) for name, p in predictors.items()}
    print(f"{'':18}{'encode (s)':>12}{'click (ms)':>12}")
    for name, (enc, dec) in results.items():
        print(f"{name:18}{enc:12.3f}{1000 * dec:12.2f}")
    (ours_enc, ours_dec), (meta_enc, meta_dec) = results.values()
    print(f"{'ours / Meta':18}{ours_enc / meta_enc:12.2f}x{ours_dec / meta_dec:11.2f}x")


if __name__ == "__main__":
    main()
