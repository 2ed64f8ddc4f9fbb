"""Our vit_b is Meta's network: same weights, same photo, same prompts -> same numbers (<= 1e-4).

Meta's `segment-anything` package is the oracle. Each vit_b image encoding costs ~13 s on CPU,
so every encoder runs once per module and the prompts reuse the cached embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as MetaPredictor
from segment_anything import sam_model_registry

from sam_train.model import build_sam, export_official
from sam_train.predictor import SamPredictor
from tests.conftest import load_test_photo, perturb_all_weights_

pytestmark = pytest.mark.slow
TOL = 1e-4

# dog.jpg is 800 x 534; coordinates in original pixels.
PROMPTS = {
    "one_point": dict(point_coords=[[420, 250]], point_labels=[1]),
    "pos_neg_points": dict(point_coords=[[420, 250], [300, 300], [600, 100], [100, 450]], point_labels=[1, 1, 0, 0]),
    "box": dict(box=[250, 100, 650, 500]),
    "box_and_points": dict(point_coords=[[420, 250], [120, 60]], point_labels=[1, 0], box=[250, 100, 650, 500]),
}


def _as_numpy(prompt: dict) -> dict:
    return {k: np.asarray(v) for k, v in prompt.items()}


def assert_close(ours: np.ndarray | torch.Tensor, theirs: np.ndarray | torch.Tensor, what: str) -> None:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs Meta's {theirs.shape}"
    diff = np.abs(ours - theirs).max()
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_test_photo("dog.jpg")


@pytest.fixture(scope="module")
def meta_predictor(official_vit_b_checkpoint, photo) -> MetaPredictor:
    predictor = MetaPredictor(sam_model_registry["vit_b"](checkpoint=str(official_vit_b_checkpoint)))
    predictor.set_image(photo)
    return predictor


@pytest.fixture(scope="module")
def our_predictor(official_vit_b_checkpoint, photo) -> SamPredictor:
    predictor = SamPredictor(build_sam("vit_b", checkpoint=official_vit_b_checkpoint))
    predictor.set_image(photo)
    return predictor


def test_image_embedding_matches(our_predictor, meta_predictor):
    ours = our_predictor.get_image_embedding()
    assert ours.shape == (1, 256, 64, 64)
    assert ours.std() > 0.1, "a degenerate embedding would make the comparison meaningless"
    assert_close(ours, meta_predictor.get_image_embedding(), "image embedding")


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_prompt_outputs_match(our_predictor, meta_predictor, prompt, multimask):
    kwargs = dict(_as_numpy(prompt), multimask_output=multimask, return_logits=True)
    masks, iou, low_res = our_predictor.predict(**kwargs)
    meta_masks, meta_iou, meta_low_res = meta_predictor.predict(**kwargs)
    assert low_res.shape == ((3 if multimask else 1), 256, 256)
    assert_close(low_res, meta_low_res, "low-res logits")
    assert_close(iou, meta_iou, "IoU predictions")
    assert_close(masks, meta_masks, "full-resolution logits")
    assert masks.shape[1:] == (534, 800)


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
def test_mask_prompt_outputs_match(our_predictor, meta_predictor, multimask):
    # The interactive loop: the previous round's best low-res logits come back as the mask prompt.
    _, iou, low_res = meta_predictor.predict(**_as_numpy(PROMPTS["one_point"]))
    previous = low_res[np.argmax(iou)][None]
    kwargs = dict(
        point_coords=np.array([[420, 250], [500, 300]]), point_labels=np.array([1, 0]),
        mask_input=previous, multimask_output=multimask,
    )
    _, iou, low_res = our_predictor.predict(**kwargs)
    _, meta_iou, meta_low_res = meta_predictor.predict(**kwargs)
    assert_close(low_res, meta_low_res, "low-res logits with a mask prompt")
    assert_close(iou, meta_iou, "IoU predictions with a mask prompt")


def test_exported_checkpoint_reproduces_our_outputs_in_meta_builder(tmp_path, photo):
    # Weights that did not come from Meta's file, so the export is what is being tested.
    ours = perturb_all_weights_(build_sam("vit_b"), seed=7)
    path = export_official(ours, tmp_path / "exported.pth")
    meta = MetaPredictor(sam_model_registry["vit_b"](checkpoint=str(path)))  # strict load inside
    ours_predictor = SamPredictor(ours)
    for predictor in (meta, ours_predictor):
        predictor.set_image(photo)
    assert_close(ours_predictor.get_image_embedding(), meta.get_image_embedding(), "exported: image embedding")
    for name in ("one_point", "box_and_points"):
        _, iou, low_res = ours_predictor.predict(**_as_numpy(PROMPTS[name]))
        _, meta_iou, meta_low_res = meta.predict(**_as_numpy(PROMPTS[name]))
        assert_close(low_res, meta_low_res, f"exported: low-res logits ({name})")
        assert_close(iou, meta_iou, f"exported: IoU ({name})")
