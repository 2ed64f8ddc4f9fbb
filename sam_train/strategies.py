"""Trainer arguments that plain YAML cannot spell: FSDP's wrap and checkpoint policies name our block
classes, and `precision: auto` depends on the hardware."""

from __future__ import annotations

import warnings

import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from timm.models.vision_transformer_sam import Block as EncoderBlock

from sam_train.model.transformer import TwoWayAttentionBlock

# Lightning's pytree helper still builds torch's LeafSpec, which torch now deprecates: a FutureWarning
# at the start of every fit and validation loop, about their code, that nothing in ours can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

# The repeated units of SAM: each is sharded (and recomputed, with activation checkpointing) on its own.
SAM_BLOCKS = {EncoderBlock, TwoWayAttentionBlock}


def fsdp_strategy(sharding_strategy: str, activation_checkpointing: bool, state_dict_type: str) -> FSDPStrategy:
    """FSDP over SAM's encoder and decoder blocks (configs/trainer/strategy/fsdp.yaml).

    `use_orig_params` keeps every parameter its own tensor, which the optimiser's per-layer lr
    and weight-decay groups need.
    """
    return FSDPStrategy(
        sharding_strategy=sharding_strategy,
        auto_wrap_policy=SAM_BLOCKS,
        activation_checkpointing_policy=SAM_BLOCKS if activation_checkpointing else None,
        state_dict_type=state_dict_type,
        use_orig_params=True,
    )


def trainer_arguments(trainer: DictConfig) -> dict:
    """The trainer group as Trainer keyword arguments; a `strategy` with `_target_` (FSDP's options) is built,
    `precision: auto` resolved (`auto_precision`)."""
    arguments = OmegaConf.to_container(trainer, resolve=True)
    if isinstance(arguments.get("strategy"), dict):
        arguments["strategy"] = instantiate(arguments["strategy"])
    if arguments.get("precision") == "auto":
        arguments["precision"] = auto_precision(arguments.get("accelerator", "auto"))
    return arguments


def auto_precision(accelerator: str) -> str:
    """bf16 autocast where the hardware computes in bf16 natively, else fp32.

    On a CPU with AVX512-BF16 or AMX, bf16 autocast runs a tiny training step ~1.7x faster
    (`scripts/bench_train.py --precision bf16`) and learns as well; on
    other CPUs bf16 is emulated and slower than fp32.
    """
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    else:
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if native else "32-true"
