"""Latency of `sam-train serve` as Label Studio sees it: the first click on an image vs the clicks after it.

Each model runs the real backend (HTTP server on 127.0.0.1, the interactive /predict request
Label Studio sends, the brush-RLE answer) on a photo read from disk, in one process:
  first click        the image is new: fetch + decode, image encoder, decoder, RLE
  first, from disk   a restarted backend: the embedding comes from the disk cache, not the encoder
  later clicks       the same object refined click by click (positive and negative points,
                     previous logits fed back): decoder + RLE only, from the in-memory cache
  box                a rectangle on the same image (in-memory cache)
Medians of --images photos (first click) and --clicks later clicks per image, with the ratio
first / later. Weights: `tiny` the built-in ones, other models random (latency does not depend on them).

    python scripts/bench_serve.py --models tiny,vit_b --images 3 --clicks 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam_train.engine.interactive import EmbeddingStore, InteractiveSegmenter
from sam_train.engine.journal import AnnotationJournal
from sam_train.engine.labelstudio import ASSISTED_LABEL_CONFIG, CLICK, DRAG, IMAGE
from sam_train.engine.mlbackend import Backend, ImageSource, Served, make_server
from sam_train.model import build_sam

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "assets"


def photos(folder: Path, count: int, out: Path) -> list[tuple[Path, int, int]]:
    """`count` distinct image files (the photos in `folder`, else synthetic 1500 x 1000 noise), with sizes."""
    found = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    files = []
    for n in range(count):
        path = out / f"photo{n}.jpg"
        if found:
            Image.open(found[n % len(found)]).convert("RGB").rotate(180 * (n // len(found))).save(path, quality=95)
        else:
            pixels = np.random.default_rng(n).integers(0, 255, (1000, 1500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=95)
        with Image.open(path) as image:
            files.append((path, *image.size))
    return files


def region(kind: str, width: int, height: int, values: dict, positive: bool = True) -> dict:
    tag = {"keypointlabels": CLICK, "rectanglelabels": DRAG}[kind]
    out = {"type": kind, "from_name": tag, "to_name": IMAGE, "original_width": width, "original_height": height,
           "value": {**values, kind: ["object"]}}
    if kind == "keypointlabels":
        out["is_positive"] = positive
    return out


def predict(url: str, image: Path, regions: list[dict]) -> float:
    """Seconds for one interactive /predict round trip."""
    body = {"tasks": [{"id": 1, "data": {"image": str(image)}}], "label_config": ASSISTED_LABEL_CONFIG,
            "params": {"context": {"result": regions}}}
    request = urllib.request.Request(url + "/predict", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        answer = json.loads(reply.read())
    seconds = time.perf_counter() - start
    assert answer["results"][0]["result"], answer
    return seconds


def bench_model(name: str, files: list[tuple[Path, int, int]], clicks: int, workdir: Path) -> dict[str, list[float]]:
    model = build_sam(name, pretrained=name == "tiny").eval()
    times: dict[str, list[float]] = {"first click": [], "first, from disk": [], "later clicks": [], "box": []}
    rng = np.random.default_rng(0)
    for restart in (False, True):
        store = EmbeddingStore(model, workdir / name, capacity=len(files) + 1)
        served = Served(InteractiveSegmenter(store), name)
        backend = Backend(lambda served=served: served, ImageSource(roots=[files[0][0].parent]),
                          AnnotationJournal(workdir / f"{name}.jsonl"))
        server = make_server(backend, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            for path, width, height in files:
                points = [region("keypointlabels", width, height, {"x": 50.0, "y": 50.0})]
                times["first, from disk" if restart else "first click"].append(predict(url, path, points))
                if restart:
                    continue
                for _ in range(clicks):
                    x, y = rng.uniform(5, 95, 2)
                    points.append(region("keypointlabels", width, height, {"x": x, "y": y}, positive=rng.random() < 0.5))
                    times["later clicks"].append(predict(url, path, points))
                box = {"x": 20.0, "y": 20.0, "width": 50.0, "height": 40.0, "rotation": 0}
                times["box"].append(predict(url, path, [region("rectanglelabels", width, height, box)]))
        finally:
            server.shutdown()
            server.server_close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit_b")
    parser.add_argument("--images", type=int, default=3, help="photos per model (each one first click)")
    parser.add_argument("--clicks", type=int, default=8, help="later clicks per photo")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    args = parser.parse_args()

    print(f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        files = photos(args.photos, args.images, Path(tmp))
        print(f"{len(files)} photos, e.g. {files[0][1]} x {files[0][2]} ({'photos' if args.photos.is_dir() else 'synthetic'})")
        print(f"{'model':8} {'first click':>12} {'from disk':>10} {'later click':>12} {'box':>8} {'first/later':>12}")
        for name in args.models.split(","):
            times = bench_model(name, files, args.clicks, Path(tmp) / "cache")
            ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
            print(f"{name:8} {ms['first click']:>10.1f}ms {ms['first, from disk']:>8.1f}ms {ms['later clicks']:>10.1f}ms"
                  f" {ms['box']:>6.1f}ms {ms['first click'] / ms['later clicks']:>11.1f}x", flush=True)


if __name__ == "__main__":
    main()
