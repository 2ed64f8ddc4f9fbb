"""`sam-train fit`: assemble model, data, module and Lightning Trainer from one Hydra config, and run.

The run folder (`<output_root>/<name>/<run id>`, the run id being $SLURM_JOB_ID when set) holds
the resolved config, Lightning checkpoints, csv/launch_*/metrics.csv, bad_samples.jsonl and, at the end, the
weights in Meta's official layout.
"""

from __future__ import annotations

import netrc
import os
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from sam_train.atomic_io import atomic_write_bytes
from sam_train.callbacks import CheckpointOnSignal, TrainClock, ValidationOverlays
from sam_train.model import FinetuneConfig, Sam, build_sam, export_official, merge_lora, prepare_finetune
from sam_train.model.init import position_matching_attention
from sam_train.module import SamModule
from sam_train.report import draw_curves, draw_sessions, final_metrics, read_log, write_report
from sam_train.strategies import trainer_arguments

RUN_ID_ENV = "SAM_TRAIN_RUN_ID"


def run_directory(cfg: DictConfig) -> Path:
    """Where this run writes: `run_dir` if set, else keyed by $SLURM_JOB_ID so a requeued job finds its own folder.

    Without either, a timestamp, exported as $SAM_TRAIN_RUN_ID so that the processes Lightning
    starts for the other ranks (which inherit the environment) write to the same folder.
    """
    if cfg.run_dir:
        return Path(cfg.run_dir)
    run_id = cfg.run_id or os.environ.get("SLURM_JOB_ID") or os.environ.get(RUN_ID_ENV) or time.strftime("%Y%m%d-%H%M%S")
    os.environ[RUN_ID_ENV] = str(run_id)
    return Path(cfg.output_root) / cfg.name / str(run_id)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from: none, the newest of this run (`auto`), or a given path."""
    if cfg.resume in (None, "", "none"):
        return None
    if cfg.resume == "auto":
        found = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        return str(found[-1]) if found else None
    if not Path(cfg.resume).is_file():
        raise FileNotFoundError(f"resume checkpoint {cfg.resume} does not exist")
    return str(cfg.resume)


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """CSV always; wandb too with `logger=wandb`, offline unless an API key is configured (no network needed)."""
    # One CSV per launch of the run: Lightning's CSVLogger deletes a metrics.csv it finds, so each
    # resume writes beside the earlier launches' (report.read_log stitches them).
    launch = len(list(run_dir.glob("csv/launch_*")))
    loggers: list[Logger] = [CSVLogger(run_dir, name="csv", version=f"launch_{launch:03d}")]
    if cfg.logger.kind == "wandb":
        online = bool(os.environ.get("WANDB_API_KEY")) or _wandb_login_saved()
        loggers.append(WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.name,
                                   id=run_dir.name, save_dir=str(run_dir), offline=not online, resume="allow",
                                   config=OmegaConf.to_container(cfg, resolve=True)))
    elif cfg.logger.kind != "csv":
        raise ValueError(f"logger.kind must be csv or wandb, got {cfg.logger.kind!r}")
    return loggers


def _wandb_login_saved() -> bool:
    """Whether `wandb login` stored a key in ~/.netrc."""
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_model(cfg: DictConfig) -> Sam:
    """The network as configs/model/ says: weights (or from-scratch init), stochastic depth, activation
    checkpointing, fine-tuning switches."""
    model = build_sam(cfg.name, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained,
                      backbone_args={"drop_path_rate": cfg.drop_path})
    if cfg.qk_match_init > 0 and cfg.checkpoint is None and not cfg.pretrained:  # loaded weights need no start
        position_matching_attention(model, cfg.qk_match_init)
    model.image_encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    return prepare_finetune(model, FinetuneConfig(**cfg.finetune))  # after loading: LoRA starts from the official weights


def fit(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Train as `cfg` says (plus any extra `callbacks`); returns the run folder.

    A run stopped by SIGUSR1 (preemption) returns right after its checkpoint: no final
    validation or export, which belong to the end of training, not to the job's last seconds.
    """
    L.seed_everything(cfg.seed, workers=True)
    run_dir = run_directory(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())

    model = build_model(cfg.model)
    datamodule = instantiate(cfg.data, image_size=model.image_size, bad_samples_log=str(run_dir / "bad_samples.jsonl"))
    module = SamModule.from_config(model, cfg)
    on_signal = CheckpointOnSignal(run_dir / "checkpoints")
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_steps=cfg.total_steps,
        logger=make_loggers(cfg, run_dir),
        callbacks=[
            ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.checkpoint_every, save_top_k=-1),
            LearningRateMonitor(logging_interval="step"),
            TrainClock(),
            ValidationOverlays(run_dir / "overlays", cfg.logger.overlay_every_n_steps, max(cfg.evaluation.clicks)),
            on_signal,
            *callbacks,
        ],
        # Under SLURM, Lightning reads ranks and nodes from the allocation; the requeue on SIGUSR1 is ours.
        plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None,
        **trainer_arguments(cfg.trainer),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir), weights_only=True)
    if on_signal.stopped:
        return run_dir
    results = trainer.validate(module, datamodule=datamodule, verbose=False) if cfg.data.val else []
    logged = results[0] if results else {}  # none when validation is off (trainer.limit_val_batches=0)
    whole = whole_module(trainer, module, cfg)
    if trainer.is_global_zero:
        export_official(merge_lora(whole.model), run_dir / f"sam_{cfg.model.name}.pth")
        summary = report_run(run_dir, cfg, whole, datamodule, logged, trainer.global_step)
        print(summary)
    return run_dir


def whole_module(trainer: L.Trainer, module: SamModule, cfg: DictConfig) -> SamModule:
    """The trained module with whole (unsharded) weights on rank 0, for export and the report.

    Under FSDP every rank holds a shard and any forward pass is a collective: the shards are
    gathered (all ranks take part) into a plain copy that rank 0 can run alone.
    """
    if not isinstance(trainer.strategy, FSDPStrategy):
        return module
    state = trainer.strategy.lightning_module_state_dict()  # full on rank 0, empty elsewhere
    whole = SamModule.from_config(build_model(cfg.model), cfg)
    if trainer.is_global_zero:
        whole.model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return whole.to(module.device)


def report_run(run_dir: Path, cfg: DictConfig, module: SamModule, datamodule, logged: dict, steps: int) -> str:
    """metrics.json, loss_curve.png and overlay.png from the final held-out validation; returns the summary table."""
    rows = read_log(run_dir)
    overlay = None
    if logged:
        batch = datamodule.on_before_batch_transfer(next(iter(datamodule.val_dataloader())), 0)
        batch = datamodule.on_after_batch_transfer(module.transfer_batch_to_device(batch, module.device, 0), 0)
        overlay = draw_sessions(module, batch, clicks=max(cfg.evaluation.clicks))
    curves = draw_curves(rows, f"{cfg.name}: {cfg.model.name}")
    return write_report(run_dir, final_metrics(logged, rows, steps), curves, overlay)
