"""`sam-train validate`: the click-based evaluation of a checkpoint on any shards, as a table and metrics.json.

It composes the same `fit` config, so `model=... model.checkpoint=PATH data.val=[...]` mean what
they mean for training; the evaluation itself is `SamModule.validation_step` under Lightning's
`Trainer.validate` (devices, precision and ranks come from `trainer`).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from sam_train.atomic_io import atomic_write_bytes
from sam_train.model import build_sam
from sam_train.module import SamModule
from sam_train.report import json_metrics
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
