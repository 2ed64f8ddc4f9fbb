"""Initialisation for training from scratch: the weights' starting values, never the architecture."""

from __future__ import annotations

import torch

from sam_train.model.sam import Sam
from sam_train.model.transformer import Attention


@torch.no_grad()
def position_matching_attention(model: Sam, scale: float) -> int:
    """Start every mask-decoder attention with its key projection equal to its query projection,
    both scaled by sqrt(`scale`); returns the number of attentions changed.

    Why: the decoder finds the prompted object by attention between prompt tokens and image tokens,
    both carrying the same random Fourier position encoding. With independent random W_q and W_k,
    the score q.k of a point's token and the image token under it is no larger than anywhere else,
    so a model trained from scratch first predicts empty masks for ~130 steps until it has
    learned to match positions. With W_k = W_q each head scores x^T W_q^T W_q y: a random projection of
    the dot product, which keeps the encodings' peak where positions agree. Masks then appear within
    ~50 steps. The idea is "mimetic" initialisation (Trockman & Kolter, 2023: W_q W_k^T ~ I), in its
    simplest form; it changes starting values only, so official checkpoints load as before.
    """
    if scale <= 0:
        raise ValueError(f"position_matching_attention needs a positive scale, got {scale}")
    attentions = decoder_attentions(model)
    for attention in attentions:
        attention.q_proj.weight.mul_(scale**0.5)
        attention.k_proj.weight.copy_(attention.q_proj.weight)
    return len(attentions)


def decoder_attentions(model: Sam) -> list[Attention]:
    """The mask decoder's attention layers: each block's self, token->image and image->token, and the final one."""
    return [module for module in model.mask_decoder.transformer.modules() if isinstance(module, Attention)]
