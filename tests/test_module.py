"""The training module: prompt tokens as SAM sees them, gradients everywhere, and a loss that goes down."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Timer

from sam_train.config import config_dir
from sam_train.data.datamodule import SA1BDataModule
from sam_train.data.pipeline import SampleConfig, collate, decode_sample, expand_batch, sample_rng
from sam_train.data.shards import iter_raw_samples, resolve_shards
from sam_train.evaluation import evaluate_clicks
from sam_train.losses import LossWeights
from sam_train.model import build_sam
from sam_train.module import SamModule, prompt_tokens
from sam_train.prompts import PromptConfig

PAPER_LOSS = LossWeights(focal=20.0, dice=1.0, iou=1.0, focal_alpha=0.25, focal_gamma=2.0, iou_loss="mse")


def configs() -> tuple[PromptConfig, dict]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        prompts = PromptConfig(**compose(config_name="prompts/sam").prompts)
        optim = dict(compose(config_name="optim/sam").optim)
    return prompts, optim


def module(total_steps: int = 100, **optim_overrides) -> SamModule:
    torch.manual_seed(0)
    prompts, optim = configs()
    return SamModule(build_sam("tiny"), prompts, PAPER_LOSS, {**optim, **optim_overrides}, total_steps)


def synth_batch(dataset, count: int = 2) -> dict:
    raws = [s for ref in resolve_shards([str(dataset)]) for s in iter_raw_samples(ref.url)][:count]
    cfg = SampleConfig(image_size=256, mask_stride=4, max_masks=16)
    return expand_batch(collate([decode_sample(r, cfg, sample_rng(0, 0, r.key)) for r in raws]), 256)


def test_point_and_box_prompts_are_tokenised_as_at_inference():
    is_point = torch.tensor([True, False])
    first = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0], [3.0, 4.0, 50.0, 60.0]])
    clicks = torch.tensor([[[9.0, 9.0]], [[11.0, 12.0]]])
    click_labels = torch.tensor([[0], [1]])
    coords, labels = prompt_tokens(is_point, first, boxes, clicks, click_labels)
    assert labels.tolist() == [[1, 0, -1], [1, 2, 3]]  # point, click, pad | click, box corners
    assert coords[0, :2].tolist() == [[5.0, 6.0], [9.0, 9.0]]
    assert coords[1].tolist() == [[11.0, 12.0], [3.0, 4.0], [50.0, 60.0]]


def session_losses(m: SamModule, batch: dict, generator: torch.Generator | None = None) -> dict:
    images = m.normalize(batch["images"], batch["content_sizes"])
    embeddings = m.model.encode_image(images)
    return m.interactive_session(embeddings, batch["masks"], batch["image_index"], float(len(batch["masks"])), generator)


@pytest.mark.slow
def test_one_step_reaches_every_trainable_part(synth_24):
    m = module()
    batch = synth_batch(synth_24)
    images = m.normalize(batch["images"], batch["content_sizes"])
    assert images[0, :, batch["content_sizes"][0, 0]:].abs().sum() == 0, "padding is exactly zero, as at inference"
    losses = session_losses(m, batch)
    assert set(losses) == {"total", "focal", "dice", "iou"} and torch.isfinite(losses["total"])
    losses["total"].backward()
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        grads = [p.grad for n, p in m.model.named_parameters() if n.startswith(part) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part


class RoundRecorder(SamModule):
    """Observes each round: whether it ran with a gradient, and its loss."""

    def _round(self, *args):
        parts, logits, iou = super()._round(*args)
        self.seen.append((torch.is_grad_enabled(), parts["total"].detach()))
        return parts, logits, iou


@pytest.mark.slow
def test_rounds_without_the_loss_run_without_a_gradient_and_every_part_still_learns(synth_24):
    m = module()
    m.__class__, m.seen = RoundRecorder, []
    m.prompts = dataclasses.replace(m.prompts, loss_rounds=3)
    losses = session_losses(m, synth_batch(synth_24), torch.Generator().manual_seed(5))
    graded = [grad for grad, _ in m.seen]
    assert len(graded) == 11 and graded[0] and sum(graded) == 3
    expected = torch.stack([total for grad, total in m.seen if grad]).mean()
    torch.testing.assert_close(losses["total"].detach(), expected)  # the mean over the graded rounds alone
    losses["total"].backward()
    trainable = [(n, p) for n, p in m.model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]


def test_a_one_round_session_still_gives_every_trainable_parameter_a_gradient(synth_24):
    # DDP (find_unused_parameters: false) waits for every parameter's gradient; a session of the first
    # prompt alone never runs the mask-prompt encoder.
    m = module()
    m.__class__, m.seen = RoundRecorder, []
    m.prompts = dataclasses.replace(m.prompts, corrective_rounds=0, empty_rounds=0)
    losses = session_losses(m, synth_batch(synth_24), torch.Generator().manual_seed(2))
    assert len(m.seen) == 1
    losses["total"].backward()
    trainable = [(n, p) for n, p in m.model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert all(p.grad.abs().sum() == 0 for p in m.model.prompt_encoder.mask_downscaling.parameters())


def test_a_curriculum_switches_to_full_sessions_at_its_share_of_the_steps_or_of_the_time_cap(monkeypatch):
    m = module(total_steps=10)
    m.prompts = dataclasses.replace(m.prompts, early_corrective_rounds=1, early_until=0.5)
    assert m.session_prompts().rounds == 1 + 1 + 2  # step 0: one click, the empty rounds as configured
    monkeypatch.setattr(m, "max_time_spent", lambda: 0.5)  # half the time cap spent, at step 0 still
    assert m.session_prompts() == m.prompts and m.session_prompts().rounds == 11
    m.prompts = dataclasses.replace(m.prompts, early_until=0.0)
    monkeypatch.setattr(m, "max_time_spent", lambda: pytest.fail("no curriculum: the clock is not read"))
    assert m.session_prompts() is m.prompts


def box_miou(m: SamModule, batch: dict) -> float:
    with torch.no_grad():
        embeddings = m.model.encode_image(m.normalize(batch["images"], batch["content_sizes"]))
        result = evaluate_clicks(m.model, embeddings, batch["masks"], batch["image_index"], [1])
    return result.iou["miou_box"].mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_overfitting_a_few_images_lowers_the_loss_and_raises_the_iou(synth_24, optimizer):
    m = module(lr=3e-3, warmup_steps=5, layer_decay=0.9, name=optimizer)
    # Dice and IoU terms only: from random init the focal term first drives every mask to
    # background, which takes longer than a unit test should run to leave.
    m.loss_weights = dataclasses.replace(m.loss_weights, focal=0.0)
    batch = synth_batch(synth_24, count=2)
    batch["masks"], batch["image_index"] = batch["masks"][::4], batch["image_index"][::4]  # a few masks: fast steps
    optimizer = m.configure_optimizers()["optimizer"]
    before = box_miou(m, batch)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = session_losses(m, batch, generator)["total"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = box_miou(m, batch)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    assert after > 0.15 and after > before + 0.1, (before, after)  # from ~0.01 at random init


def test_checkpointed_rounds_give_the_same_loss_and_gradients(synth_24):
    batch = synth_batch(synth_24)
    grads = []
    for checkpointed in (False, True):
        m = module()
        m.prompts = dataclasses.replace(m.prompts, checkpoint_rounds=checkpointed)
        loss = session_losses(m, batch, torch.Generator().manual_seed(3))["total"]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.model.mask_decoder.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    torch.testing.assert_close(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fits_in_a_real_trainer_with_the_datamodule(synth_24, tmp_path):
    dm = SA1BDataModule([str(synth_24)], image_size=256, sample={"mask_stride": 4, "max_masks": 8}, batch_size=2,
                        num_workers=0, pin_memory=False)
    m = module(total_steps=3, warmup_steps=1)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.1)
    trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


class GradientNorms(L.Callback):
    """The global gradient norm of every step before clipping (Lightning calls this hook first) and after it."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []

    @staticmethod
    def norm(module: L.LightningModule) -> float:
        return float(torch.stack([p.grad.double().norm() for p in module.parameters() if p.grad is not None]).norm())

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer) -> None:
        self.before.append(self.norm(module))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        self.after.append(self.norm(module))  # what the optimiser stepped with: zero_grad waits for the next step


@pytest.mark.slow
@pytest.mark.parametrize("clip", [0.1, None])
def test_the_gradient_norm_is_logged_before_clipping_and_clipping_still_holds(synth_24, tmp_path, clip):
    dm = SA1BDataModule([str(synth_24)], image_size=256, sample={"mask_stride": 4, "max_masks": 4}, batch_size=2,
                        num_workers=0, pin_memory=False)
    norms = GradientNorms()
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=clip, callbacks=[norms])
    trainer.fit(module(total_steps=2, warmup_steps=1), datamodule=dm)
    logged = float(trainer.callback_metrics["train/grad_norm"])  # the last step's
    assert logged == pytest.approx(norms.before[-1], rel=1e-5)
    if clip is None:
        assert norms.after == pytest.approx(norms.before, rel=1e-6)  # measured, not scaled
    else:
        assert min(norms.before) > clip  # a from-scratch start: clipping bites, so the test below means something
        assert max(norms.after) <= clip * (1 + 1e-5)


def test_the_time_cooldown_reads_the_trainers_max_time_clock_as_a_resumed_run_restores_it():
    cooled = module(total_steps=1000, schedule="cosine", warmup_steps=0, time_cooldown=0.5)
    plain = module(total_steps=1000, schedule="cosine", warmup_steps=0)
    trainer = L.Trainer(max_time="00:00:10:00", accelerator="cpu", logger=False, enable_checkpointing=False)
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    timer.load_state_dict({"time_elapsed": {"train": 450.0}})  # what Lightning restores from a run's checkpoint
    for m in (cooled, plain):
        m.trainer = trainer
    assert cooled.max_time_spent() == pytest.approx(0.75)
    cooled_lr = cooled.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    plain_lr = plain.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    by_steps = 0.5 * (1 + math.cos(0.1 * math.pi))  # step 100 of 1,000
    assert plain_lr(100) == pytest.approx(by_steps)  # no cooldown: the step alone
    assert cooled_lr(100) == pytest.approx(0.5 * by_steps)  # half of the last half of the budget left
