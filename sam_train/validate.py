"""`sam-train validate`: the click-based evaluation of a checkpoint on any shards, as a table and metrics.json.

It composes the same `fit` config, so `model=... model.checkpoint=PATH data.val=[...]` mean what
they mean for training; the evaluation itself is `SamModule.validation_step` under Lightning's
`Trainer.validate` (devices, precision and ranks come from `trainer`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from sam_train.atomic_io import atomic_write_bytes
from sam_train.model import build_sam
from sam_train.module import SamModule
from sam_train.strategies import trainer_arguments


def validate(cfg: DictConfig) -> dict:
    """Evaluate `model.checkpoint` on every batch of `data.val`; write `<validate_out>/metrics.json` and return it."""
    if not cfg.model.checkpoint:
        raise ValueError("sam-train validate needs model.checkpoint=PATH (an official-layout .pth or .safetensors)")
    if not cfg.data.val:
        raise ValueError("sam-train validate needs data.val=[shards...] to evaluate on")
    out = Path(cfg.validate_out)
    model = build_sam(cfg.model.name, checkpoint=cfg.model.checkpoint)
    # The shards as given: a missing folder is an error here, never a reason to synthesise one.
    datamodule = instantiate(cfg.data, image_size=model.image_size, synthesize=None,
                             bad_samples_log=str(out / "bad_samples.jsonl"))
    module = SamModule.from_config(model, cfg)
    # Every batch: trainer.limit_val_batches only bounds the validation inside `fit`.
    trainer_args = {**trainer_arguments(cfg.trainer), "limit_val_batches": 1.0}
    trainer = L.Trainer(**trainer_args, default_root_dir=out, logger=False, enable_checkpointing=False)
    (logged,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    if "val/masks" not in logged:
        raise ValueError(f"no masks to evaluate in data.val={list(cfg.data.val)}")
    report = {
        "model": cfg.model.name,
        "checkpoint": str(cfg.model.checkpoint),
        "val": [str(source) for source in cfg.data.val],
        "metrics": json_metrics(logged),
    }
    if trainer.is_global_zero:
        atomic_write_bytes(out / "metrics.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


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
