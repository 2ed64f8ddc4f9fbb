"""The training module: prompt tokens as SAM sees them, gradients everywhere, and a loss that goes down."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir

from sam_train.config import config_dir
from sam_train.data.datamodule import SA1BDataModule
from sam_train.data.pipeline import SampleConfig, collate, decode_sample, expand_batch, sample_rng
from sam_train.data.shards import iter_raw_samples, resolve_shards
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


def session_losses(m: SamModule, batch: dict) -> dict:
    images = m.normalize(batch["images"], batch["content_sizes"])
    return m.interactive_session(m.model.encode_image(images), batch["masks"], batch["image_index"], float(len(batch["masks"])))


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


def test_a_few_steps_on_one_batch_lower_the_loss(synth_24):
    m = module(warmup_steps=1)
    batch = synth_batch(synth_24)
    optimizer = m.configure_optimizers()["optimizer"]
    torch.manual_seed(1)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = session_losses(m, batch)["total"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_fits_in_a_real_trainer_with_the_datamodule(synth_24, tmp_path):
    dm = SA1BDataModule([str(synth_24)], image_size=256, sample={"mask_stride": 4, "max_masks": 8}, batch_size=2,
                        num_workers=0, pin_memory=False)
    m = module(total_steps=3, warmup_steps=1)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.1)
    trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
