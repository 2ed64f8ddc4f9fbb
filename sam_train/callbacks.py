"""Lightning callbacks of a training run: what the Trainer does not log by itself."""

from __future__ import annotations

import time

import lightning as L


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
