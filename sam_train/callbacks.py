"""Lightning callbacks of a training run: what the Trainer does not log by itself."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy

from sam_train.atomic_io import atomic_write_bytes
from sam_train.report import draw_sessions

log = logging.getLogger(__name__)


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

    Not under FSDP: there a forward pass on rank 0 alone would wait forever for the other ranks'
    shards (the run's final overlay.png is still drawn, from the gathered weights).
    """

    def __init__(self, folder: Path, every_n_steps: int, clicks: int) -> None:
        self.folder, self.every_n_steps, self.clicks = Path(folder), every_n_steps, clicks
        self._last_step = -1

    def on_validation_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch: dict,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        step = trainer.global_step
        due = self._last_step < 0 or step - self._last_step >= self.every_n_steps
        if (batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or not due or not len(batch["masks"])
                or isinstance(trainer.strategy, FSDPStrategy)):
            return
        self._last_step = step
        png = draw_sessions(module, batch, self.clicks)
        path = self.folder / f"step_{step:07d}.png"
        atomic_write_bytes(path, png)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/sessions", [str(path)], step=step, caption=[f"{self.clicks} clicks, step {step}"])


class CheckpointOnSignal(L.Callback):
    """On SIGUSR1 (SLURM's `--signal=SIGUSR1@90` warning), checkpoint at the next step boundary, requeue, stop.

    Lightning's own SLURM handler saves from inside the signal handler, wherever the step happens
    to be (half-way through the optimiser's update, or with the next batch already counted as
    consumed), and each rank at a different moment. Here the handler only raises a flag; after
    the step every rank agrees whether any rank was signalled, all save the same step (model,
    optimiser, scheduler and data position together), rank 0 asks SLURM to requeue the job, and
    training stops cleanly. The requeued job (same $SLURM_JOB_ID, so the same run folder)
    resumes from that checkpoint with `resume=auto`: no sample repeated, none skipped.
    """

    def __init__(self, folder: Path, signum: int = signal.SIGUSR1) -> None:
        self.folder, self.signum = Path(folder), signum
        self._signalled = False
        self._previous = None
        self.stopped = False  # whether this fit ended on a signal

    def _handle(self, signum: int, frame) -> None:
        self._signalled = True

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            self._previous = signal.signal(self.signum, self._handle)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        path = self.folder / f"preempted-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        log.warning("signal %d: saved %s at step %d; stopping", self.signum, path, trainer.global_step)
        if trainer.is_global_zero:
            requeue_slurm_job()
        trainer.should_stop = True
        self.stopped = True
        self._signalled = False


def requeue_slurm_job() -> None:
    """`scontrol requeue` this job (array task included); outside SLURM, or without scontrol, only say so."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job or shutil.which("scontrol") is None:
        log.warning("not requeued (no SLURM job or no scontrol): rerun with resume=auto to continue")
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
    else:
        log.warning("requeued SLURM job %s", job)
