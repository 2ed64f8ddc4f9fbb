"""LoRA (Hu et al., 2021) on the image encoder's attention, and merging it back for export.

A wrapped layer computes `base(x) + B(A(dropout(x))) * alpha / rank` with the loaded `base`
frozen; B starts at zero, so a freshly wrapped model computes exactly what it loaded. Merging
folds `B @ A * scale` into the base weight and puts the plain `nn.Linear` back, so the state
dict has Meta's keys again and `export_official` writes a file Meta's builder loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)  # the point of LoRA: the loaded weight stays as loaded
        weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))  # r x in
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))  # out x r
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's init, as in the paper's code
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded in (accumulated in fp32): same outputs, plain `nn.Linear` keys."""
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        self.base.weight.copy_(self.base.weight.float() + delta)
        return self.base


def add_lora(encoder: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float) -> int:
    """Wrap the `targets` Linear layers (e.g. `qkv`, `proj`) of every `attn` module of `encoder`; returns how many."""
    wrapped = 0
    for name, module in list(encoder.named_modules()):
        if name.rsplit(".", 1)[-1] != "attn":
            continue
        for target in targets:
            layer = getattr(module, target, None)
            if not isinstance(layer, nn.Linear):
                linears = [n for n, m in module.named_children() if isinstance(m, nn.Linear)]
                raise ValueError(f"LoRA target {target!r} is not a Linear layer of {name}; its Linear layers: {linears}")
            setattr(module, target, LoRALinear(layer, rank, alpha, dropout))
            wrapped += 1
    if not wrapped:
        raise ValueError("no attention modules named 'attn' to put LoRA on")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear of `model` back into a plain `nn.Linear`, in place; returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.merged())
    return model
