"""Package a finished run's weights as the built-in weights of its model (`build_sam(name, pretrained=True)`).

Writes sam_train/weights/<model>.safetensors (official key layout) and <model>.json beside it:
the command, git commit, resolved config, data seed and held-out metrics that produced them, so
anyone can retrain the same weights and see what they are worth.

    python scripts/ship_builtin_weights.py RUN_DIR --command "sam-train fit experiment=pretrain_synth_tiny ..."
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

from sam_train.atomic_io import atomic_write_bytes
from sam_train.model import build_sam, export_official
from sam_train.model.build import BUILTIN_WEIGHTS_DIR

MAX_BYTES = 20 * 2**20  # the package ships them: keep the wheel small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--command", required=True, help="the exact command that trained the run")
    args = parser.parse_args()
    config = OmegaConf.to_container(OmegaConf.load(args.run_dir / "config.yaml"))
    name = config["model"]["name"]
    model = build_sam(name, checkpoint=args.run_dir / f"sam_{name}.pth")
    weights = export_official(model, BUILTIN_WEIGHTS_DIR / f"{name}.safetensors")
    if weights.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{weights} is {weights.stat().st_size / 2**20:.1f} MB, over the {MAX_BYTES / 2**20:.0f} MB limit")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=args.run_dir).stdout.strip()
    record = {
        "model": name,
        "command": args.command,
        "git_commit": commit or None,
        "data_seed": config["data"]["synthesize"]["seed"] if config["data"].get("synthesize") else None,
        "metrics": json.loads((args.run_dir / "metrics.json").read_text()),
        "config": config,
    }
    atomic_write_bytes(BUILTIN_WEIGHTS_DIR / f"{name}.json", (json.dumps(record, indent=2) + "\n").encode())
    print(f"{weights} ({weights.stat().st_size / 2**20:.1f} MB) and {name}.json")


if __name__ == "__main__":
    main()
