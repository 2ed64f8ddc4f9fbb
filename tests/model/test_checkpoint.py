"""Official-layout checkpoints in and out, and clear errors for files that are not usable."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from sam_train.model import MODEL_SPECS, CheckpointError, build_sam, export_official
from sam_train.model.checkpoint import internal_to_official, official_to_internal
from tests.conftest import build_meta_sam_like, perturb_all_weights_


@pytest.fixture
def tiny_file(tmp_path) -> tuple[torch.nn.Module, Path]:
    model = perturb_all_weights_(build_sam("tiny"), seed=5)
    return model, export_official(model, tmp_path / "tiny.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_then_load_roundtrip(tmp_path, suffix):
    model = perturb_all_weights_(build_sam("tiny"), seed=4)
    path = export_official(model, tmp_path / f"tiny{suffix}")
    loaded = build_sam("tiny", checkpoint=path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary files may be left behind"


def test_export_has_meta_key_layout_and_meta_modules_reproduce_our_encoder(tiny_file):
    model, path = tiny_file
    state = torch.load(path, weights_only=True)
    assert any(".mlp.lin1." in k for k in state) and not any(".mlp.fc1." in k for k in state)
    meta = build_meta_sam_like(MODEL_SPECS["tiny"])
    meta.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), meta.image_encoder(images), atol=1e-4, rtol=0)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        build_sam("tiny", checkpoint="nope.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    model = build_sam("tiny")
    path = export_official(model, tmp_path / f"tiny{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"tiny\{suffix}: not a readable .*truncated or corrupt"):
        build_sam("tiny", checkpoint=path)


def test_checkpoint_of_another_model_names_shape_mismatches(official_vit_b_checkpoint):
    with pytest.raises(CheckpointError) as info:
        build_sam("tiny", checkpoint=official_vit_b_checkpoint)
    message = str(info.value)
    assert "does not fit this model" in message
    assert "image_encoder.patch_embed.proj.weight: file (768, 3, 16, 16) vs model (192, 3, 16, 16)" in message
    assert "unexpected keys: image_encoder.blocks.4." in message  # vit_b has 12 blocks, tiny 4


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_file):
    _, path = tiny_file
    state = torch.load(path, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError) as info:
        build_sam("tiny", checkpoint=tmp_path / "edited.pth")
    assert "1 missing keys: mask_decoder.iou_token.weight" in str(info.value)
    assert "1 unexpected keys: mask_decoder.extra_head.weight" in str(info.value)


class _Payload:
    """Unpickling this would run code: it must be refused before that can happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_never_executed(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"image_encoder.pos_embed": _Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="never unpickle"):
        build_sam("tiny", checkpoint=path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload,found",
    [([torch.zeros(2)], "got list"), ({"model": {"a": torch.zeros(1)}}, "non-tensor entries model")],
)
def test_pickle_that_is_not_a_flat_state_dict(tmp_path, payload, found):
    path = tmp_path / "odd.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"expected a flat state dict.*{found}"):
        build_sam("tiny", checkpoint=path)


def test_internal_official_key_maps_are_inverse():
    state = build_sam("tiny").state_dict()
    assert list(official_to_internal(internal_to_official(state))) == list(state)
