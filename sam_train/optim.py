"""SAM's optimiser recipe: AdamW parameter groups with layer-wise lr decay, and the lr schedules.

Paper recipe (configs/optim/): AdamW, lr 8e-4, weight decay 0.1 except norms, biases and
positional tables, layer-wise lr decay on the image encoder, 250 linear warmup steps, then the lr
divided by 10 at 2/3 and at 26/27 of training; a cosine schedule is the alternative.
`optim.name=muon` swaps AdamW's update for Muon's on the linear layers' weight matrices
(`MuonAdamW`), keeping every other part of the recipe.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

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


class ParamRole(NamedTuple):
    """How the recipe treats one parameter."""

    layer: int  # encoder depth for layer-wise lr decay (`encoder_layer_id`)
    decay: bool  # weight decay applies (not norms, biases, positional tables)
    matrix: bool  # the weight of an nn.Linear: Muon's orthogonalised update applies where chosen


def decay_layout(model: Sam) -> dict[str, ParamRole]:
    """The role of every parameter, by unwrapped name.

    Read before a strategy wraps the model: once FSDP shards it, every parameter looks like a
    flat 1-D tensor, and "no decay on 1-D tensors" would then catch them all.
    """
    num_blocks = len(model.image_encoder.blocks)
    no_decay_names = {f"image_encoder.{n}" for n in model.image_encoder.no_weight_decay()}
    linear_weights = {f"{m}.weight" for m, module in model.named_modules() if isinstance(module, nn.Linear)}
    return {
        name: ParamRole(
            encoder_layer_id(name, num_blocks),
            param.ndim > 1 and name not in no_decay_names and "rel_pos" not in name,
            name in linear_weights,
        )
        for name, param in model.named_parameters()
    }


def parameter_groups(
    model: Sam,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    layout: dict[str, ParamRole] | None = None,
    split_matrices: bool = False,
) -> list[dict]:
    """Optimiser groups: lr x layer_decay ** (distance from the encoder's top), no decay on 1-D tensors and positions.

    With `split_matrices`, linear layers' weights get groups of their own, marked `"muon": True`
    (`MuonAdamW`). `layout` (`decay_layout` of the unwrapped model) is required once the model is sharded.
    """
    layout = layout or decay_layout(model)
    num_blocks = len(model.image_encoder.blocks)
    groups: dict[tuple[int, bool, bool], dict] = {}
    for wrapped_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _WRAPPERS.sub("", wrapped_name)
        role = layout[name]
        key = (role.layer, role.decay, role.matrix and split_matrices)
        if key not in groups:
            scale = layer_decay ** (num_blocks + 1 - role.layer)
            groups[key] = {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": weight_decay if role.decay else 0.0, "muon": key[2]}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# Newton-Schulz quintic coefficients that push every singular value into ~[0.7, 1.2] in 5 steps
# (Jordan et al., "Muon", 2024): an approximate U V^T of the update, cheap enough for every step.
_NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrices: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """U V^T of each matrix's SVD (... x m x n), approximately (singular values ~0.7-1.2): Newton-Schulz in bf16."""
    a, b, c = _NEWTON_SCHULZ
    x = matrices.to(torch.bfloat16)
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else x.mT  # iterate on the smaller Gram matrix
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # singular values <= 1: where the iteration converges
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(matrices.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked `"muon"` (linear layers' weights), AdamW on the rest.

    Muon replaces a matrix's momentum by its nearest semi-orthogonal matrix, so every direction
    of the update moves at the same rate, however the gradient's singular values spread; in
    transformers this has trained as far as AdamW in fewer steps. The update is scaled by 0.2 x
    sqrt(max(rows, cols)), the RMS of a typical AdamW update (Liu et al., "Muon is scalable for LLM
    training", 2025), so one lr, weight decay and schedule serve both kinds of group and an AdamW
    recipe switches by `optim.name` alone. Matrices must be whole: FSDP's flat shards are refused.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        ns_steps: int = 5,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "momentum": momentum,
                    "ns_steps": ns_steps, "muon": False}
        super().__init__(params, defaults)
        for group in self.param_groups:
            flat = [tuple(p.shape) for p in group["params"] if group["muon"] and p.ndim != 2]
            if flat:
                raise ValueError(f"Muon needs whole 2-D weight matrices, got shapes {flat[:3]} (FSDP shards them: "
                                 "use optim.name=adamw there)")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}  # by shape and iteration count
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay, as AdamW's
                if group["muon"]:
                    momentum = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    momentum.lerp_(p.grad, 1 - group["momentum"])
                    nesterov = p.grad.lerp(momentum, group["momentum"])
                    key = (p.shape, p.dtype, p.device, group["ns_steps"])
                    matrices.setdefault(key, []).append((p, nesterov, group))
                else:
                    self._adamw_update(p, group)
        # Matrices of one shape are orthogonalised together: one batched product instead of many small ones.
        for (shape, *_, steps), items in matrices.items():
            updates = orthogonalize(torch.stack([u for _, u, _ in items]), steps)
            scale = 0.2 * math.sqrt(max(shape))
            for (p, _, group), update in zip(items, updates):
                p.add_(update, alpha=-group["lr"] * scale)
        return loss

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] = step = state["step"] + 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))


def build_optimizer(model: Sam, optim: dict, layout: dict[str, ParamRole] | None = None) -> torch.optim.Optimizer:
    """The optimiser `optim.name` names, over the recipe's `parameter_groups` (`layout` as there)."""
    if optim["name"] not in ("adamw", "muon"):
        raise ValueError(f"optim.name must be 'adamw' or 'muon', got {optim['name']!r}")
    muon = optim["name"] == "muon"
    groups = parameter_groups(model, optim["lr"], optim["weight_decay"], optim["layer_decay"], layout,
                              split_matrices=muon)
    if muon:
        return MuonAdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), momentum=optim["muon_momentum"])
    return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]))


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
