"""Lightning strategies that plain YAML cannot spell: FSDP's wrap and checkpoint policies name our block classes."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from timm.models.vision_transformer_sam import Block as EncoderBlock

from sam_train.model.transformer import TwoWayAttentionBlock

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
