"""Checkpoints in and out, in Meta's official flat layout.

Official files (`sam_vit_b_01ec64.pth`, ...) are a flat state dict with `image_encoder.*`,
`prompt_encoder.*` and `mask_decoder.*` keys. Our prompt encoder and decoder use the same names;
the image encoder is timm's `VisionTransformerSAM`, whose only naming difference is the block
MLP (`mlp.fc1`/`mlp.fc2` here, `mlp.lin1`/`mlp.lin2` in Meta's files).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from sam_train.atomic_io import atomic_path

_OFFICIAL_MLP = re.compile(r"^(image_encoder\.blocks\.\d+\.mlp)\.lin([12])\.")
_INTERNAL_MLP = re.compile(r"^(image_encoder\.blocks\.\d+\.mlp)\.fc([12])\.")
_LISTED = 10  # how many offending keys an error message names


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and the file named."""


StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a flat name -> tensor dict from a .pth/.pt (never unpickling code) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_safetensors(path, device="cpu")
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors, and we never unpickle those "
                f"(torch.load weights_only=True). Save the model's state_dict() instead. Detail: {exc}"
            ) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: expected a flat state dict (name -> tensor) as in Meta's SAM checkpoints, "
            f"got {type(state).__name__}"
            + (f" with non-tensor entries {_first([k for k, v in state.items() if not isinstance(v, torch.Tensor)])}"
               if isinstance(state, dict) else "")
        )
    return state


def official_to_internal(state: StateDict) -> StateDict:
    """Rename Meta's keys to ours."""
    return {_OFFICIAL_MLP.sub(r"\1.fc\2.", k): v for k, v in state.items()}


def internal_to_official(state: StateDict) -> StateDict:
    """Rename our keys to Meta's."""
    return {_INTERNAL_MLP.sub(r"\1.lin\2.", k): v for k, v in state.items()}


def load_official(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an official-layout checkpoint into `model`, strictly: every key present, every shape equal."""
    state = official_to_internal(read_state_dict(path))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{path} does not fit this model (wrong model name or not a SAM checkpoint?)"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label}: {_first(keys)}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state, strict=True)


def export_official(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` as a file Meta's `sam_model_registry[...](checkpoint=path)` loads strictly.

    `.safetensors` paths get safetensors (same keys); anything else a torch.save'd state dict.
    The write is atomic, so an interrupted export never leaves a truncated file behind.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in internal_to_official(model.state_dict()).items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_safetensors(state, str(tmp))
        else:
            torch.save(state, tmp)
    return path


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown + (f", ... (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else "")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names and bytes): which weights made a dataset or a cache, for safe reuse."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
