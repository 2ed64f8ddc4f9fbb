"""Shared fixtures: real photos from tests/assets and official-format checkpoints with random weights."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam_train.data.synth import synth_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_ASSETS = Path(__file__).resolve().parent / "assets"  # real photos shipped with the tests (see its README.md)


def load_test_photo(name: str) -> np.ndarray:
    """A real RGB photo from tests/assets (H x W x 3 uint8)."""
    return np.asarray(Image.open(TEST_ASSETS / name).convert("RGB"))


def perturb_all_weights_(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Add seeded Gaussian noise to every floating tensor of the state dict, in place.

    Default inits leave many tensors at 0 or 1 (positional and relative-position embeddings,
    biases, norms); a parity test over such weights could not see a mis-mapped or unused tensor.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * std)
    return model


@pytest.fixture(scope="session")
def official_vit_b_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vit_b checkpoint written by Meta's own builder, with random (perturbed) weights."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    meta = perturb_all_weights_(sam_model_registry["vit_b"](), seed=1)
    path = tmp_path_factory.mktemp("official") / "sam_vit_b_random.pth"
    torch.save(meta.state_dict(), path)
    return path


def build_meta_sam_like(spec) -> torch.nn.Module:
    """Meta's own `Sam` modules, sized like one of our specs (e.g. `tiny`), with Meta's default init.

    Meta's registry only knows vit_b/l/h; building its classes at our small sizes lets fast tests
    compare every module against the oracle without a 90M-parameter network.
    """
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    args = {**dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14), **spec.backbone_args}
    size = spec.embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=spec.image_size, patch_size=spec.patch_size, embed_dim=args["embed_dim"], depth=args["depth"],
            num_heads=args["num_heads"], mlp_ratio=4, out_chans=spec.prompt_dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=args["window_size"],
            global_attn_indexes=tuple(args["global_attn_indexes"]),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_dim, image_embedding_size=(size, size),
            input_image_size=(spec.image_size, spec.image_size), mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=spec.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=spec.prompt_dim,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_heads,
            ),
        ),
    ).eval()


@pytest.fixture
def tiny_pair():
    """(our tiny Sam, Meta's Sam of the same shape) holding identical perturbed weights."""
    from sam_train.model import MODEL_SPECS, build_sam
    from sam_train.model.checkpoint import official_to_internal

    torch.manual_seed(0)
    meta = perturb_all_weights_(build_meta_sam_like(MODEL_SPECS["tiny"]), seed=3)
    ours = build_sam("tiny").eval()
    ours.load_state_dict(official_to_internal(meta.state_dict()), strict=True)
    return ours, meta


# Variables by which launchers (torchrun, Lightning, SLURM) tell a process its rank: a test that starts
# processes hands them only the ones it means (the suite itself may run inside a SLURM job).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def process_env(**variables: str) -> dict[str, str]:
    """This environment without any launcher's rank variables, one thread per process (ranks share
    2 cores), the repository importable, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **variables}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_synth(root: Path, images: int, per_shard: int, seed: int = 0) -> Path:
    out = root / f"synth_{images}_{per_shard}_{seed}"
    if not (out / "manifest.json").exists():
        synth_dataset(out, images=images, seed=seed, samples_per_shard=per_shard, workers=1)
    return out


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def synth_24(synth_root: Path) -> Path:
    """24 samples in 6 shards of 4."""
    return make_synth(synth_root, 24, 4)
