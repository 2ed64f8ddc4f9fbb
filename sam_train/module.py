"""The LightningModule: the maths of one SAM training step with simulated interactive prompts.

One step: the image encoder runs once per image; then every mask of the batch goes through a
simulated interactive session together (the decoder runs once per round over all masks): a
first point or box, corrective clicks from the previous prediction's errors, the previous
best low-res logits fed back as the mask prompt. Each round's prediction is supervised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint
from torchmetrics.regression import PearsonCorrCoef

from sam_train.embed import check_cache_fits
from sam_train.evaluation import batch_metrics, evaluate_clicks
from sam_train.losses import LossWeights, sam_loss
from sam_train.model import Sam
from sam_train.model.prompt_encoder import BOX_BOTTOM_RIGHT_LABEL, BOX_TOP_LEFT_LABEL, PAD_LABEL, POSITIVE_LABEL
from sam_train.optim import build_optimizer, decay_layout, lr_multiplier
from sam_train.prompts import (
    PromptConfig,
    corrective_clicks,
    first_point,
    loss_round_flags,
    noisy_boxes,
    round_schedule,
)


def prompt_tokens(
    is_point: torch.Tensor, first: torch.Tensor, boxes: torch.Tensor, clicks: torch.Tensor, click_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token coordinates (N x T x 2) and labels (N x T) exactly as SAM sees them at inference.

    A point prompt is [first point, clicks..., not-a-point] (Meta pads point-only prompts) and a
    box prompt [clicks..., top-left, bottom-right] (points before the box, no padding): both
    have T = clicks + 2 tokens, so one decoder call serves every mask of the batch.
    """
    n, device = len(is_point), first.device
    pad = torch.zeros(n, 1, 2, device=device)
    point_coords = torch.cat([first[:, None], clicks, pad], dim=1)
    box_coords = torch.cat([clicks, boxes.view(n, 2, 2)], dim=1)
    label = lambda value: torch.full((n, 1), value, dtype=torch.long, device=device)  # noqa: E731
    point_labels = torch.cat([label(POSITIVE_LABEL), click_labels, label(PAD_LABEL)], dim=1)
    box_labels = torch.cat([click_labels, label(BOX_TOP_LEFT_LABEL), label(BOX_BOTTOM_RIGHT_LABEL)], dim=1)
    coords = torch.where(is_point[:, None, None], point_coords, box_coords)
    labels = torch.where(is_point[:, None], point_labels, box_labels)
    return coords, labels


class SamModule(L.LightningModule):
    """Trains a `Sam` with simulated interactive prompts and SAM's losses."""

    def __init__(
        self,
        model: Sam,
        prompts: PromptConfig,
        loss: LossWeights,
        optim: dict,
        total_steps: int,
        eval_clicks: Sequence[int] = (),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.prompts = prompts
        self.loss_weights = loss
        self.optim = dict(optim)
        self.total_steps = total_steps
        self.seed = seed  # prompts of step s on rank r come from (seed, s, r) alone: a resumed run repeats them exactly
        if any(k < 1 for k in eval_clicks):
            raise ValueError(f"evaluation click counts must be >= 1, got {list(eval_clicks)}")
        self.eval_clicks = tuple(eval_clicks)  # validation reports mIoU after these many clicks (none: the box only)
        self.iou_correlation = PearsonCorrCoef()  # over the whole validation set, not averaged per batch
        self._decay_layout = decay_layout(model)  # read now: FSDP flattens parameter shapes when it wraps

    @classmethod
    def from_config(cls, model: Sam, cfg: DictConfig) -> SamModule:
        """The module a `fit`-composed config describes: prompts, loss, optimiser, length, evaluation, seed."""
        return cls(
            model,
            PromptConfig(**cfg.prompts),
            LossWeights(**cfg.loss),
            OmegaConf.to_container(cfg.optim, resolve=True),
            cfg.total_steps,
            eval_clicks=tuple(cfg.evaluation.clicks),
            seed=cfg.seed,
        )

    def normalize(self, images: torch.Tensor, content_sizes: torch.Tensor) -> torch.Tensor:
        """uint8 canvases -> normalised input with exact zeros in the padding (`Sam.normalize_canvas`)."""
        return self.model.normalize_canvas(images, content_sizes)

    def image_embeddings(self, batch: dict) -> torch.Tensor:
        """B x C x h x w: the batch's cached `embeddings` when the data brings them (decoder-only training
        from `data.embedding_cache`, checked against this model in `setup`), else the image encoder's."""
        if "embeddings" in batch:
            return batch["embeddings"]
        return self.model.encode_image(self.normalize(batch["images"], batch["content_sizes"]))

    def setup(self, stage: str) -> None:
        """Refuse an embedding cache made by another encoder, or one that training would change."""
        cache = getattr(self._trainer.datamodule, "embedding_cache", None) if self._trainer is not None else None
        if cache is not None:
            check_cache_fits(self.model, cache)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Named scopes ("encoder", "prompts", "decoder", "loss") are what scripts/bench_train.py
        # profiles; without a profiler running they cost nothing.
        with record_function("encoder"):
            embeddings = self.image_embeddings(batch)  # B x C x h x w
        images = len(embeddings)
        num_masks = self._loss_normaliser(len(batch["masks"]))
        generator = torch.Generator(device=self.device).manual_seed(hash((self.seed, self.global_step, self.global_rank)))
        prompts = self.session_prompts()
        masks, image_index = batch["masks"], batch["image_index"]
        losses = self.interactive_session(embeddings, masks, image_index, num_masks, generator, prompts)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=images)
        self.log("train/rounds", float(prompts.rounds), batch_size=images)
        self.log("train/loss", losses["total"], prog_bar=True, batch_size=images)
        return losses["total"]

    def session_prompts(self) -> PromptConfig:
        """This step's sessions: a curriculum's early ones (`prompts.early_until`) until training is that far
        through its steps or its time cap, whichever it reaches first (a machine slower than the step count was
        sized for still gets the full sessions before the cap), then `prompts` as configured."""
        if not self.prompts.early_until:
            return self.prompts
        return self.prompts.at_progress(max(self.global_step / max(self.total_steps, 1), self.max_time_spent()))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """mIoU after each `eval_clicks` count (given and oracle mask) and with the box; the IoU head's calibration."""
        targets = batch["masks"]
        if len(targets) == 0:
            return
        embeddings = self.image_embeddings(batch)
        result = evaluate_clicks(self.model, embeddings, targets, batch["image_index"], self.eval_clicks)
        metrics = {f"val/{name}": value for name, value in batch_metrics(result).items()}
        self.log_dict(metrics, batch_size=len(targets), sync_dist=True)
        self.log("val/masks", float(len(targets)), reduce_fx="sum", sync_dist=True)
        self.iou_correlation.update(result.predicted_iou, result.real_iou)
        self.log("val/iou_corr", self.iou_correlation)

    def interactive_session(
        self,
        embeddings: torch.Tensor,
        targets: torch.Tensor,
        image_index: torch.Tensor,
        num_masks: float,
        generator: torch.Generator | None = None,
        prompts: PromptConfig | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run SAM's simulated interactive rounds (`prompts`, else the module's) over all N masks at once; the loss
        is averaged over rounds."""
        if len(targets) == 0:  # every mask was cropped away: still touch every parameter for DDP
            zero = self._zero_touch(self)
            return {"total": zero, "focal": zero, "dice": zero, "iou": zero}
        cfg, device = prompts or self.prompts, targets.device
        n = len(targets)
        size = self.model.image_size
        stride = size // targets.shape[-1]
        with torch.no_grad(), record_function("prompts"):
            is_point = torch.rand(n, device=device, generator=generator) < cfg.point_prob
            first = first_point(targets, stride, cfg.centre_click_prob, generator)
            boxes = noisy_boxes(targets, stride, cfg, size, generator)
        clicks = torch.zeros(n, 0, 2, device=device)
        click_labels = torch.zeros(n, 0, dtype=torch.long, device=device)
        image_pe = self.model.prompt_encoder.get_dense_pe()
        mask_prompt = None
        totals: dict[str, torch.Tensor] = {}
        kinds = ["first"] + round_schedule(cfg, generator)
        graded = loss_round_flags(cfg, generator)
        graded_count, training = sum(graded), torch.is_grad_enabled()
        for kind, with_loss in zip(kinds, graded):
            if kind == "click":
                with torch.no_grad(), record_function("prompts"):
                    predicted = self._at(mask_prompt, targets.shape[-2:]) > 0
                    point, label = corrective_clicks(
                        predicted[:, 0], targets, stride, cfg.gt_click_prob, cfg.centre_click_prob, generator
                    )
                clicks = torch.cat([clicks, point[:, None]], dim=1)
                click_labels = torch.cat([click_labels, label[:, None]], dim=1)
            coords, labels = prompt_tokens(is_point, first, boxes, clicks, click_labels)
            # Multiple outputs only where the prompt is one point (ambiguous); else the single output.
            multimask = is_point & (clicks.shape[1] == 0) & cfg.multimask_single_point
            args = (embeddings, image_pe, image_index, coords, labels, mask_prompt, targets, multimask, num_masks)
            with torch.set_grad_enabled(training and with_loss):
                if cfg.checkpoint_rounds and torch.is_grad_enabled():
                    parts, logits, iou = checkpoint(self._round, *args, use_reentrant=False)
                else:
                    parts, logits, iou = self._round(*args)
            if with_loss:
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + value / graded_count
            # Feed back the highest-predicted-IoU output's logits, detached: each round is its own prediction.
            best = torch.where(multimask, iou[:, 1:].argmax(1) + 1, torch.zeros_like(iou[:, 0], dtype=torch.long))
            mask_prompt = logits[torch.arange(n, device=device), best][:, None].detach()
            if mask_prompt.shape[-2:] != self.model.prompt_encoder.mask_input_size:
                mask_prompt = self._at(mask_prompt, self.model.prompt_encoder.mask_input_size)
        if training and len(kinds) == 1:  # no round took a mask prompt: its encoder still joins the graph, for DDP
            totals["total"] = totals["total"] + self._zero_touch(self.model.prompt_encoder.mask_downscaling)
        return totals

    @staticmethod
    def _zero_touch(module: torch.nn.Module) -> torch.Tensor:
        """0 x the sum of every trainable parameter of `module`: a zero gradient, not none, for each. DDP (with
        `find_unused_parameters: false`) waits for a gradient of every parameter in every step."""
        return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0

    def _round(
        self,
        embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        image_index: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_prompt: torch.Tensor | None,
        targets: torch.Tensor,
        multimask: torch.Tensor,
        num_masks: float,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One round: prompts -> all 4 outputs of every mask -> this round's loss parts (and the logits, scores)."""
        encoder = self.model.prompt_encoder
        with record_function("decoder"):
            sparse = encoder.embed_points(coords, labels, pad=False)
            dense = encoder.no_mask_dense(len(coords)) if mask_prompt is None else encoder.embed_masks(mask_prompt)
            logits, iou = self.model.mask_decoder.predict_all_masks(embeddings, image_pe, sparse, dense, image_index)
        with record_function("loss"):
            parts = self._round_loss(logits, iou, targets, multimask, num_masks)
        return parts, logits, iou

    def _round_loss(
        self, logits: torch.Tensor, iou: torch.Tensor, targets: torch.Tensor, multimask: torch.Tensor, num_masks: float
    ) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        for rows, outputs in ((multimask, slice(1, None)), (~multimask, slice(0, 1))):
            if rows.any():
                for key, value in sam_loss(logits[rows, outputs], iou[rows, outputs], targets[rows], self.loss_weights, num_masks).items():
                    parts[key] = parts.get(key, 0.0) + value
        return parts

    @staticmethod
    def _at(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def _loss_normaliser(self, local: int) -> float:
        """Masks in the whole step across ranks, divided by the number of ranks.

        DDP and FSDP average gradients over ranks; dividing each rank's loss sum by
        (global masks / ranks) makes that average the gradient of (all masks' loss / all masks),
        the same as one process with the whole batch, however the masks are split.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return max(float(local), 1.0)
        count = trainer.strategy.reduce(torch.tensor(float(local), device=self.device), reduce_op="sum")
        return max(float(count), 1.0) / trainer.world_size

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the global gradient norm (under FSDP through the sharded root module, which sees every shard) and
        log it, before clipping, as `train/grad_norm`.

        The recipe clips hard (`optim.grad_clip`: 0.1); the logged norm says how hard: a norm far
        above the clip all run long means the clip, not the lr, sets the size of every step.
        Gradients are whole (all-reduced, unscaled) here, so every rank logs the same norm.
        """
        if gradient_clip_algorithm not in (None, "norm"):  # clipping by value: Lightning's, with no norm to log
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):  # an infinite clip scales by 1: the norm alone
            norm = self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val or math.inf)
        else:
            params = self.trainer.precision_plugin.main_params(optimizer)
            norm = (torch.nn.utils.clip_grad_norm_(params, gradient_clip_val) if gradient_clip_val
                    else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        self.log("train/grad_norm", norm, batch_size=1)

    def max_time_spent(self) -> float:
        """The fraction of `trainer.max_time` spent training, earlier launches of a resumed run included
        (Lightning's Timer restores them from the checkpoint); 0 without a cap or a Trainer. Rank 0's clock,
        broadcast: ranks whose lrs differed by their clocks' skew would let DDP's replicas drift apart."""
        trainer = self._trainer
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None) if trainer is not None else None
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is None:
            return 0.0
        elapsed = timer.time_elapsed()
        duration = elapsed + remaining  # the Timer's max_time, which it keeps private
        spent = min(1.0, elapsed / max(duration, 1e-9))
        return trainer.strategy.broadcast(spent) if trainer.world_size > 1 else spent

    def configure_optimizers(self):
        o = self.optim
        optimizer = build_optimizer(self.model, o, self._decay_layout)
        schedule = lr_multiplier(o["schedule"], self.total_steps, o["warmup_steps"], tuple(o["milestones"]), o["gamma"],
                                 cooldown=o["time_cooldown"], budget_spent=self.max_time_spent)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
