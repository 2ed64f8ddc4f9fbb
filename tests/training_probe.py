"""Run `sam_train.train.fit` with a recorder attached, for the distributed and preemption tests.

    python tests/training_probe.py OUT [overrides...]

Every process (rank) appends what it saw to OUT/rank<r>.jsonl, one line per optimiser step:
the step, the sample keys of its batch and the gradient norm after the all-reduce (before
clipping), and writes its final weights to OUT/rank<r>.safetensors. Lightning re-runs this same
script for the other local ranks when it starts them, so they record too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from sam_train.config import load_config
from sam_train.train import fit


class StepRecorder(L.Callback):
    """Per optimiser step: sample keys of this rank's batch and the global gradient norm (pre-clip)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._keys: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        self._keys = list(batch["keys"])

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer) -> None:
        grads = [p.grad.detach().double().norm() for p in module.parameters() if p.grad is not None]
        line = {"step": trainer.global_step, "keys": self._keys, "grad_norm": float(torch.stack(grads).norm())}
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        weights = {k: v.detach().contiguous() for k, v in module.model.state_dict().items()}
        save_file(weights, self.out / f"rank{trainer.global_rank}.safetensors")


def main() -> None:
    out, *overrides = sys.argv[1:]
    Path(out).mkdir(parents=True, exist_ok=True)
    fit(load_config("fit", overrides), callbacks=[StepRecorder(Path(out))])


if __name__ == "__main__":
    main()
