"""Lightning callbacks of a training run: what the Trainer does not log by itself."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from sam_train.atomic_io import atomic_write_bytes


class TrainClock(L.Callback):
    """Logs `time/train_seconds`: wall-clock time spent training, validation excluded, carried across resumes.

    mIoU-versus-time curves and the quick start's `train_seconds` read it; steps alone hide how
    long a recipe really takes on a given machine.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = None

    def _pause(self) -> None:
        if self._since is not None:
            self.seconds += time.monotonic() - self._since
            self._since = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._since = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        self._pause()
        self._since = time.monotonic()
        module.log("time/train_seconds", self.seconds)

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._pause()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._since = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._pause()

    def state_dict(self) -> dict:
        running = time.monotonic() - self._since if self._since is not None else 0.0
        return {"seconds": self.seconds + running}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = float(state_dict["seconds"])


class ValidationOverlays(L.Callback):
    """Every `every_n_steps`, draws click sessions of the first validation batch (image, clicks, predicted vs
    true mask) into `<run>/overlays/step_<N>.png`, and to wandb when it logs: numbers say how much a model
    improves, pictures say where it fails (boundaries, small parts, ambiguity).
    """

    def __init__(self, folder: Path, every_n_steps: int, clicks: int) -> None:
        self.folder, self.every_n_steps, self.clicks = Path(folder), every_n_steps, clicks
        self._last_step = -1

    def on_validation_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch: dict,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        step = trainer.global_step
        due = self._last_step < 0 or step - self._last_step >= self.every_n_steps
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or not due or not len(batch["masks"]):
            return
        from sam_train.report import draw_sessions  # the report draws with the module: import at use, no cycle

        self._last_step = step
        png = draw_sessions(module, batch, self.clicks)
        path = self.folder / f"step_{step:07d}.png"
        atomic_write_bytes(path, png)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/sessions", [str(path)], step=step, caption=[f"{self.clicks} clicks, step {step}"])
