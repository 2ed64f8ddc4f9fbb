"""What a finished training run leaves for people to read: metrics.json, curves, an overlay and a summary table.

Written by `sam-train fit` after its final validation, from files of the run itself (the
Lightning CSV log and the final model), so a report can be redrawn from a run folder alone.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from sam_train.atomic_io import atomic_write_bytes
from sam_train.evaluation import evaluate_clicks
from sam_train.module import SamModule
from sam_train.visualize import draw_session

CURVE_METRICS = ("miou_1click_oracle", "miou_1click", "miou_5click", "miou_box")


def read_log(run_dir: Path) -> list[dict[str, float]]:
    """The run's metric rows over all its launches (csv/launch_*/metrics.csv), numbers only.

    A resume restarts from its checkpoint's step, so rows an earlier launch logged at or after
    that step were redone: the later launch's rows replace them.
    """
    rows: list[dict[str, float]] = []
    for path in sorted(run_dir.glob("csv/launch_*/metrics.csv")):
        with open(path, newline="") as f:
            # Lightning leaves the columns a row did not log empty.
            launch = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
        if launch:
            start = min(r["step"] for r in launch)
            rows = [r for r in rows if r["step"] < start] + launch
    return rows


def final_metrics(logged: dict[str, float], rows: list[dict[str, float]], steps: int) -> dict:
    """metrics.json: the final held-out evaluation, flat (`miou_1click`, ..., `iou_corr`), plus training time and steps."""
    seconds = max((r["time/train_seconds"] for r in rows if "time/train_seconds" in r), default=0.0)
    metrics = json_metrics(logged)
    return {**metrics, "train_seconds": round(seconds, 1), "steps": steps}


def draw_curves(rows: list[dict[str, float]], title: str) -> bytes:
    """PNG: training loss against step, and held-out mIoU against training minutes."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    if train:
        left.plot(*zip(*train), lw=1)
    left.set(xlabel="step", ylabel="training loss", title="loss")
    left.set_yscale("log")
    val = [r for r in rows if "val/miou_box" in r]
    clock = [(r["step"], r["time/train_seconds"]) for r in rows if "time/train_seconds" in r]
    for name in CURVE_METRICS:
        points = [(_minutes_at(r["step"], clock), r[f"val/{name}"]) for r in val if f"val/{name}" in r]
        if points:
            right.plot(*zip(*points), marker="o", ms=3, label=name)
    right.set(xlabel="training minutes", ylabel="held-out mIoU", title="held-out evaluation", ylim=(0, 1))
    right.grid(alpha=0.3)
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _minutes_at(step: float, clock: list[tuple[float, float]]) -> float:
    """Training minutes at `step`: the clock reading logged at the nearest step at or before it."""
    before = [seconds for s, seconds in clock if s <= step]
    return (before[-1] if before else 0.0) / 60


@torch.no_grad()
def draw_sessions(module: SamModule, batch: dict, clicks: int, count: int = 4) -> bytes:
    """PNG: `count` click sessions of one validation batch (image, clicks, predicted vs true mask), side by side."""
    model = module.model
    embeddings = model.encode_image(module.normalize(batch["images"], batch["content_sizes"]))
    targets, owner = batch["masks"], batch["image_index"]
    result = evaluate_clicks(model, embeddings, targets, owner, [clicks])
    # The largest masks of different images first: an overlay people can read.
    order = targets.flatten(1).sum(1).argsort(descending=True).tolist()
    picked, seen = [], set()
    for i in order:
        if int(owner[i]) not in seen or len(seen) >= len(batch["images"]):
            picked.append(i)
            seen.add(int(owner[i]))
        if len(picked) == count:
            break
    tiles = [
        draw_session(
            batch["images"][int(owner[i])].permute(1, 2, 0).cpu().numpy(),
            targets[i].cpu().numpy(),
            result.masks[i].cpu().numpy(),
            result.clicks[i].cpu().numpy(),
            result.click_labels[i].cpu().numpy(),
        )
        for i in picked
    ]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(tiles, axis=1)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_report(run_dir: Path, metrics: dict, curves_png: bytes, overlay_png: bytes | None) -> str:
    """Write metrics.json, loss_curve.png and overlay.png atomically into the run folder; return the summary table."""
    atomic_write_bytes(run_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    atomic_write_bytes(run_dir / "loss_curve.png", curves_png)
    if overlay_png is not None:
        atomic_write_bytes(run_dir / "overlay.png", overlay_png)
    evaluated = {k: v for k, v in metrics.items() if k not in ("train_seconds", "steps")}
    table = format_metrics(evaluated) if evaluated else "no held-out evaluation (no validation data or batches)"
    return f"{table}\ntrained {metrics['steps']} steps in {metrics['train_seconds'] / 60:.1f} min -> {run_dir}"


def json_metrics(logged: Mapping[str, float]) -> dict[str, float | int | None]:
    """Logged `val/...` metrics as metrics.json holds them: no prefix, a count as an int, NaN (undefined) as null."""
    metrics = {name.removeprefix("val/"): float(v) for name, v in logged.items() if name.startswith("val/")}
    return {k: int(v) if k == "masks" else None if math.isnan(v) else v for k, v in metrics.items()}


def format_metrics(metrics: Mapping[str, float | None]) -> str:
    """The evaluation as a text table: one row per prompt (top-IoU and oracle mIoU), then the IoU head's calibration.

    `metrics` are named as `validate` reports them (`miou_3click`, `iou_mae`, ...; no `val/`).
    "top-IoU" is the mask the model gives: the highest-scored of 3 after one click, the single
    output after more clicks or a box.
    """
    cell = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    clicks = sorted(int(m.group(1)) for name in metrics if (m := re.fullmatch(r"miou_(\d+)click", name)))
    rows = [(f"mIoU {k} click{'s' if k > 1 else ''}", metrics[f"miou_{k}click"], metrics[f"miou_{k}click_oracle"])
            for k in clicks]
    rows += [("mIoU box", metrics["miou_box"], None), ("IoU head MAE", metrics["iou_mae"], None),
             ("IoU head corr", metrics["iou_corr"], None)]
    lines = [f"{'metric':16} {'top-IoU':>8} {'oracle':>8}"]
    lines += [f"{name:16} {cell(top):>8} {cell(oracle):>8}" for name, top, oracle in rows]
    if "masks" in metrics:
        lines.append(f"({int(metrics['masks'])} masks)")
    return "\n".join(lines)
