"""Hydra configs: `configs/` is the single source of truth for hyper-parameters."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


def config_dir() -> Path:
    """The `configs/` folder: $SAM_TRAIN_CONFIG_DIR, else the one beside the package in a checkout."""
    path = Path(os.environ.get("SAM_TRAIN_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))
    if not (path / "fit.yaml").is_file():
        raise FileNotFoundError(
            f"no sam-train configs at {path}: run from a checkout (pip install -e .) or set SAM_TRAIN_CONFIG_DIR"
        )
    return path


def load_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `configs/<name>.yaml` with Hydra command-line style overrides (`model=vit_b seed=3`)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides or []))
