"""Registry of named SAM configurations and `build_sam`, the one way to make a model."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import timm
from torch import nn

from sam_train.model.checkpoint import load_official
from sam_train.model.mask_decoder import MaskDecoder
from sam_train.model.prompt_encoder import PromptEncoder
from sam_train.model.sam import Sam
from sam_train.model.transformer import TwoWayTransformer


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one named model. Training hyper-parameters live in configs/, not here."""

    backbone: str  # timm model name of the image encoder
    image_size: int = 1024
    backbone_args: dict[str, Any] = field(default_factory=dict)  # overrides of timm's definition
    prompt_dim: int = 256  # width of the neck output, prompt embeddings and decoder
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16
    patch_size: int = 16

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


MODEL_SPECS: dict[str, SamSpec] = {
    "vit_b": SamSpec("samvit_base_patch16"),
    "vit_l": SamSpec("samvit_large_patch16"),
    "vit_h": SamSpec("samvit_huge_patch16"),
    # For CPU training and tests: the SAM ViT recipe (windowed + global attention, relative
    # positions, conv neck) shrunk to 4 blocks of width 192 at 256 px input, i.e. a 16 x 16
    # embedding and 64 x 64 low-res masks; decoder at half width.
    "tiny": SamSpec(
        "samvit_base_patch16",
        image_size=256,
        backbone_args=dict(embed_dim=192, depth=4, num_heads=3, window_size=8, global_attn_indexes=(1, 3)),
        prompt_dim=128,
        decoder_mlp_dim=1024,
    ),
}


# Weights that ship inside the package (sam_train/weights/<name>.safetensors, official layout), each
# with <name>.json beside it: the command, config, data seed and held-out metrics that produced it.
BUILTIN_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def builtin_weights(name: str) -> Path:
    """The packaged weights of `name`: so demos and the data engine start from a model that already segments."""
    path = BUILTIN_WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        shipped = sorted(p.stem for p in BUILTIN_WEIGHTS_DIR.glob("*.safetensors"))
        raise KeyError(f"no built-in weights for {name!r}; shipped: {', '.join(shipped) or 'none'}")
    return path


def build_sam(
    name: str, checkpoint: str | os.PathLike | None = None, pretrained: bool = False, **overrides: Any
) -> Sam:
    """Build the named model; `checkpoint` loads an official-layout file (.pth or .safetensors),
    `pretrained=True` the weights shipped in the package (see `builtin_weights`).

    `overrides` replace fields of the spec; `backbone_args` entries are merged into the spec's
    (e.g. `build_sam("vit_b", backbone_args={"drop_path_rate": 0.1})`).
    """
    if name not in MODEL_SPECS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_SPECS)}")
    if pretrained and checkpoint is not None:
        raise ValueError("give either checkpoint or pretrained=True, not both")
    if pretrained:
        checkpoint = builtin_weights(name)
    spec = MODEL_SPECS[name]
    if "backbone_args" in overrides:
        overrides["backbone_args"] = {**spec.backbone_args, **overrides["backbone_args"]}
    spec = dataclasses.replace(spec, **overrides)
    model = build_from_spec(spec)
    if checkpoint is not None:
        load_official(model, checkpoint)
    return model


def build_from_spec(spec: SamSpec) -> Sam:
    """Instantiate a randomly initialised SAM from a spec."""
    image_encoder = timm.create_model(
        spec.backbone,
        pretrained=False,
        num_classes=0,
        img_size=spec.image_size,
        patch_size=spec.patch_size,
        neck_chans=spec.prompt_dim,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),  # SAM's eps; timm's class default is 1e-5
        **spec.backbone_args,
    )
    size = spec.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_dim,
        image_embedding_size=(size, size),
        input_image_size=(spec.image_size, spec.image_size),
        mask_in_chans=spec.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=spec.prompt_dim,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_dim,
            num_heads=spec.decoder_heads,
            mlp_dim=spec.decoder_mlp_dim,
        ),
        iou_head_hidden_dim=spec.prompt_dim,
    )
    return Sam(image_encoder, prompt_encoder, mask_decoder, image_size=spec.image_size)
