"""Fine-tuning switches: which parts of a loaded SAM learn, and LoRA on the encoder's attention.

Applied after the official weights are loaded and before the optimiser is built: frozen
parameters get `requires_grad=False`, so `parameter_groups` leaves them out of the optimiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sam_train.model.lora import add_lora
from sam_train.model.sam import Sam


@dataclass(frozen=True)
class FinetuneConfig:
    """The `finetune:` block of configs/model/*.yaml."""

    freeze_image_encoder: bool
    freeze_prompt_encoder: bool
    freeze_mask_decoder: bool
    lora_rank: int  # 0: no LoRA
    lora_alpha: float  # the update is scaled by alpha / rank
    lora_dropout: float
    lora_targets: Sequence[str]  # Linear layers of each encoder attention block: qkv, proj


def prepare_finetune(model: Sam, cfg: FinetuneConfig) -> Sam:
    """Freeze the parts `cfg` names, then add LoRA (trainable even in a frozen encoder); in place, returns `model`."""
    model.image_encoder.requires_grad_(not cfg.freeze_image_encoder)
    model.prompt_encoder.requires_grad_(not cfg.freeze_prompt_encoder)
    model.mask_decoder.requires_grad_(not cfg.freeze_mask_decoder)
    if cfg.lora_rank:
        add_lora(model.image_encoder, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"nothing left to train: {cfg}")
    return model
