"""SAM's optimiser recipe: AdamW parameter groups with layer-wise lr decay, and the lr schedules.

Paper recipe (configs/optim/): AdamW, lr 8e-4, weight decay 0.1 except norms, biases and
positional tables, layer-wise lr decay on the image encoder, 250 linear warmup steps, then the lr
divided by 10 at 2/3 and at 26/27 of training; a cosine schedule is the alternative.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from sam_train.model import Sam

_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def encoder_layer_id(name: str, num_blocks: int) -> int:
    """Depth of a parameter for layer-wise decay: embeddings 0, block i -> i + 1, everything after the blocks num_blocks + 1."""
    if name.startswith(("image_encoder.patch_embed", "image_encoder.pos_embed")):
        return 0
    match = _BLOCK.match(name)
    return int(match.group(1)) + 1 if match else num_blocks + 1


# Prefixes that wrappers (FSDP, activation checkpointing, torch.compile) insert into parameter names.
_WRAPPERS = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def decay_layout(model: Sam) -> dict[str, tuple[int, bool]]:
    """(encoder layer, weight decay or not) of every parameter, by unwrapped name.

    Read before a strategy wraps the model: once FSDP shards it, every parameter looks like a
    flat 1-D tensor, and "no decay on 1-D tensors" would then catch them all.
    """
    num_blocks = len(model.image_encoder.blocks)
    no_decay_names = {f"image_encoder.{n}" for n in model.image_encoder.no_weight_decay()}
    return {
        name: (encoder_layer_id(name, num_blocks), param.ndim > 1 and name not in no_decay_names and "rel_pos" not in name)
        for name, param in model.named_parameters()
    }


def parameter_groups(
    model: Sam, lr: float, weight_decay: float, layer_decay: float, layout: dict[str, tuple[int, bool]] | None = None
) -> list[dict]:
    """AdamW groups: lr scaled by layer_decay ** (distance from the top of the encoder), no decay on 1-D tensors and positional tables.

    `layout` (`decay_layout` of the unwrapped model) is required once the model is sharded.
    """
    layout = layout or decay_layout(model)
    num_blocks = len(model.image_encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for wrapped_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _WRAPPERS.sub("", wrapped_name)
        layer, decay = key = layout[name]
        if key not in groups:
            scale = layer_decay ** (num_blocks + 1 - layer)
            groups[key] = {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_multiplier(
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    milestones: tuple[float, ...] = (),
    gamma: float = 0.1,
    cooldown: float = 0.0,
    budget_spent: Callable[[], float] | None = None,
) -> Callable[[int], float]:
    """Step -> lr multiplier: linear warmup, then "step" (x gamma at each milestone fraction) or "cosine" decay.

    `cooldown` > 0 with `budget_spent` (the fraction of a wall-clock budget used, 0 to 1): over the
    budget's last `cooldown` fraction the multiplier also falls linearly to 0. A machine slower than
    the one the step count was sized for is stopped by the budget mid-schedule; it then still ends
    with the lr annealed, while the steps keep the lr they would have had. Where the steps end first,
    the schedule is (all but) its step-driven self.
    """
    if schedule not in ("step", "cosine"):
        raise ValueError(f"lr schedule must be 'step' or 'cosine', got {schedule!r}")
    if not 0.0 <= cooldown < 1.0:
        raise ValueError(f"lr cooldown must be a fraction of the time budget in [0, 1), got {cooldown}")
    boundaries = [int(round(m * total_steps)) for m in milestones]

    def by_steps(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "step":
            return gamma ** sum(step >= b for b in boundaries)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    if not cooldown or budget_spent is None:
        return by_steps

    def cooled(step: int) -> float:
        return by_steps(step) * min(1.0, max(0.0, 1.0 - budget_spent()) / cooldown)

    return cooled
