"""Automatic mask generation, ours vs Meta's SamAutomaticMaskGenerator: same vit_b weights, same photo, same settings, one process.

Prints, for each: masks found, end-to-end seconds, image-encoder seconds, decoder-side seconds
(everything but the encoder: prompts, mask decoder, upsampling, filters, NMS, RLE) and, inside
that, the mask-decoder network alone, each as wall-clock and as process CPU time (the steadier
one when other work shares the machine: the two generators run one after the other); then the fraction of Meta's masks that ours matches at
IoU >= 0.95 (a mask from the same prompt point, else any of ours) and the decoder-side speed-up.

Weights are random, built by Meta's `sam_model_registry["vit_b"]()` (seed 0), saved once and
loaded by both. Two departures from a plain random init, both for realism: each transposed
convolution of the mask upscaling gets one random kernel for all 4 sub-pixels (independent ones
make every untrained mask a 4-pixel checkerboard, whose run-length encoding dominates Meta's
time as no trained model's masks would), and the filters are relaxed so masks survive: random
logits stay within +-1, so every stability score (threshold +-1) is 0 and, as every mask spans
the image, box NMS would keep one. Defaults therefore turn off the IoU, stability and NMS
filters, i.e. every mask of every prompt is compared. Meta's small-region cleaning needs OpenCV
(absent here), so `min_mask_region_area` is 0 for both.

    nice -n 19 python scripts/bench_autolabel.py                    # 32 x 32 points, no crops
    nice -n 19 python scripts/bench_autolabel.py --crop-n-layers 1 --points-per-side 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

from sam_train.data.synthetic import draw_scene
from sam_train.engine.amg import AmgSettings, generate_masks
from sam_train.model import build_sam
from sam_train.predictor import SamPredictor

DEFAULT_PHOTO = Path(__file__).resolve().parents[1] / "tests" / "assets" / "dog.jpg"
MATCH_IOU = 0.95


class Stopwatch:
    """Accumulates the wall-clock and process CPU time spent in wrapped callables (or `with` blocks).

    CPU time (all threads) is the steadier measure on a shared machine: another process's load
    stretches wall time but not the work done.
    """

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Stopwatch":
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return timed


def random_vit_b(path: Path) -> None:
    """Meta's randomly initialised vit_b, one kernel per upscaling convolution for all sub-pixels, saved to `path`."""
    torch.manual_seed(0)
    model = sam_model_registry["vit_b"]()
    with torch.no_grad():
        for conv in (model.mask_decoder.output_upscaling[0], model.mask_decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight[..., :1, :1].expand_as(conv.weight))
    torch.save(model.state_dict(), path)


def matched_fraction(theirs: list[dict], ours: list[dict]) -> tuple[float, int]:
    """(fraction of `theirs` with a mask of `ours` at IoU >= MATCH_IOU, how many of theirs are empty and left out)."""
    def rle(ann: dict) -> dict:
        seg = ann["segmentation"]
        return {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}

    by_point: dict[tuple, list[int]] = {}
    for k, ann in enumerate(ours):
        by_point.setdefault(tuple(np.round(ann["point_coords"][0], 3)), []).append(k)
    our_rles = [rle(a) for a in ours]
    nonempty = [a for a in theirs if a["area"] > 0]
    matched = 0
    for ann in nonempty:
        same_point = by_point.get(tuple(np.round(ann["point_coords"][0], 3)), [])
        for candidates in (same_point, range(len(ours))):
            if candidates and mask_utils.iou([rle(ann)], [our_rles[k] for k in candidates], [0] * len(candidates)).max() >= MATCH_IOU:
                matched += 1
                break
    return matched / max(len(nonempty), 1), len(theirs) - len(nonempty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--crop-n-points-downscale-factor", type=int, default=1)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0)
    parser.add_argument("--stability-score-thresh", type=float, default=0.0)
    parser.add_argument("--box-nms-thresh", type=float, default=1.0)
    parser.add_argument("--crop-nms-thresh", type=float, default=0.7)
    args = parser.parse_args()

    if args.photo.is_file():
        image = np.asarray(Image.open(args.photo).convert("RGB"))
        source = args.photo.name
    else:
        image = draw_scene(np.random.default_rng(0), 534, 800).image
        source = f"synthetic scene ({args.photo} not found)"
    settings = dict(
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=1.0,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        crop_nms_thresh=args.crop_nms_thresh,
        crop_overlap_ratio=512 / 1500,
        crop_n_points_downscale_factor=args.crop_n_points_downscale_factor,
        min_mask_region_area=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "sam_vit_b_random.pth"
        random_vit_b(checkpoint)
        meta_model = sam_model_registry["vit_b"](checkpoint=str(checkpoint)).eval()
        our_model = build_sam("vit_b", checkpoint=checkpoint).eval()

    print(f"vit_b (random weights), CPU with {torch.get_num_threads()} threads, {source} {image.shape[1]}x{image.shape[0]}")
    print(f"{settings['points_per_side']}^2 points, {settings['crop_n_layers']} crop layers, batches of"
          f" {settings['points_per_batch']}; pred_iou_thresh {settings['pred_iou_thresh']},"
          f" stability_score_thresh {settings['stability_score_thresh']}, box_nms_thresh {settings['box_nms_thresh']}")

    # Meta: time its predictor's set_image (the encoder) and its mask decoder's forward.
    meta = SamAutomaticMaskGenerator(meta_model, output_mode="coco_rle", **settings)
    # One untimed encoding each, so that neither side pays the process's one-off warm-up.
    meta.predictor.set_image(image)
    SamPredictor(our_model).set_image(image)
    meta_total, meta_encoder, meta_decoder = Stopwatch(), Stopwatch(), Stopwatch()
    meta.predictor.set_image = meta_encoder.wrap(meta.predictor.set_image)
    meta_model.mask_decoder.forward = meta_decoder.wrap(meta_model.mask_decoder.forward)
    with meta_total:
        theirs = meta.generate(image)

    ours_settings = AmgSettings(**settings, crop_edge_margin=20.0, max_mask_coverage=None)
    our_total, our_encoder, our_decoder = Stopwatch(), Stopwatch(), Stopwatch()
    SamPredictor.set_image = our_encoder.wrap(SamPredictor.set_image)
    for step in ("prepare_one_image", "attend_one_image", "iou_from_tokens", "masks_from_tokens"):
        setattr(our_model.mask_decoder, step, our_decoder.wrap(getattr(our_model.mask_decoder, step)))
    with our_total:
        ours = generate_masks(our_model, image, ours_settings)

    fraction, empty = matched_fraction(theirs, ours)
    print(f"{'':24}{'Meta':>10}{'ours':>10}{'Meta/ours':>11}   (wall-clock s | process CPU s, all threads)")
    print(f"{'masks':24}{len(theirs):>10}{len(ours):>10}")
    rows = [
        ("end-to-end", meta_total, our_total),
        ("image encoder", meta_encoder, our_encoder),
        ("decoder side", None, None),
        ("  mask decoder net", meta_decoder, our_decoder),
    ]
    for label, theirs_watch, ours_watch in rows:
        for clock in ("wall", "cpu"):
            if theirs_watch is None:  # everything but the encoder
                theirs_s = getattr(meta_total, clock) - getattr(meta_encoder, clock)
                ours_s = getattr(our_total, clock) - getattr(our_encoder, clock)
            else:
                theirs_s, ours_s = getattr(theirs_watch, clock), getattr(ours_watch, clock)
            name = f"{label} ({clock})"
            print(f"{name:24}{theirs_s:>10.1f}{ours_s:>10.1f}{theirs_s / ours_s:>10.2f}x")
    note = f" ({empty} empty masks of Meta's left out)" if empty else ""
    print(f"Meta's masks matched by ours at IoU >= {MATCH_IOU}: {100 * fraction:.2f}%{note}")


if __name__ == "__main__":
    main()
