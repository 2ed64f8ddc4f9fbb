"""SamPredictor: the embedding is computed once per image, prompts are validated, batching works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_train.model import build_sam
from sam_train.predictor import SamPredictor
from tests.conftest import perturb_all_weights_


@pytest.fixture
def predictor() -> SamPredictor:
    torch.manual_seed(0)
    p = SamPredictor(perturb_all_weights_(build_sam("tiny"), seed=0))
    p.set_image(np.random.default_rng(0).integers(0, 256, size=(120, 200, 3), dtype=np.uint8))
    return p


def test_embedding_is_computed_once_per_image(predictor):
    calls = []
    handle = predictor.model.image_encoder.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        for x in (10, 50, 150):
            predictor.predict(point_coords=np.array([[x, 60]]), point_labels=np.array([1]))
        predictor.predict(box=np.array([5, 5, 100, 100]))
        assert calls == []
        predictor.set_image(np.zeros((64, 64, 3), dtype=np.uint8))
        assert calls == [1]
    finally:
        handle.remove()


def test_output_shapes_follow_meta(predictor):
    masks, iou, low_res = predictor.predict(point_coords=np.array([[30, 40]]), point_labels=np.array([1]))
    assert masks.shape == (3, 120, 200) and masks.dtype == bool
    assert iou.shape == (3,)
    assert low_res.shape == (3, 64, 64)
    masks, iou, low_res = predictor.predict(
        point_coords=np.array([[30, 40]]), point_labels=np.array([1]), mask_input=low_res[:1],
        multimask_output=False, return_logits=True,
    )
    assert masks.shape == (1, 120, 200) and masks.dtype == np.float32
    assert predictor.input_size == (154, 256) and predictor.original_size == (120, 200)


def test_predict_torch_batches_prompts(predictor):
    coords = torch.tensor([[[20.0, 30.0]], [[100.0, 80.0]]])
    labels = torch.ones(2, 1, dtype=torch.int)
    masks, iou, low_res = predictor.predict_torch(coords, labels, multimask_output=True)
    assert masks.shape == (2, 3, 120, 200) and iou.shape == (2, 3) and low_res.shape == (2, 3, 64, 64)
    single = predictor.predict_torch(coords[1:], labels[1:], multimask_output=True)[2]
    torch.testing.assert_close(low_res[1:], single, atol=1e-5, rtol=0)


def test_bgr_input_equals_rgb_input(predictor):
    image = np.random.default_rng(1).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    predictor.set_image(image)
    rgb = predictor.get_image_embedding().clone()
    predictor.set_image(image[..., ::-1].copy(), image_format="BGR")
    torch.testing.assert_close(predictor.get_image_embedding(), rgb)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(point_coords=np.array([[1, 2]])), "point_labels must be given"),
        (dict(point_coords=np.array([1, 2]), point_labels=np.array([1])), "point_coords must be N x 2"),
        (dict(box=np.array([1, 2, 3])), "box must be 4 numbers"),
        (dict(mask_input=np.zeros((1, 32, 32))), "mask_input must be B x 1 x 64 x 64"),
    ],
)
def test_bad_prompts_are_refused_clearly(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


@pytest.mark.parametrize("image", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), [[0]]])
def test_bad_images_are_refused_clearly(image):
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        SamPredictor(build_sam("tiny")).set_image(image)


def test_predict_before_set_image():
    with pytest.raises(RuntimeError, match="set an image"):
        SamPredictor(build_sam("tiny")).predict(box=np.array([0, 0, 5, 5]))
