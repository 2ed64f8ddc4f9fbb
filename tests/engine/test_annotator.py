"""The simulated annotator: keeps good model masks, corrects rough ones with counted clicks, deletes and adds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sam_train.data.synthetic import draw_cells
from sam_train.engine.annotator import AnnotatorConfig, review_image
from sam_train.model import build_sam
from sam_train.predictor import SamPredictor

CFG = AnnotatorConfig(accept_iou=0.85, match_iou=0.5, max_clicks=6, clicks_per_image=1000, min_area=100, name="sim")


@pytest.fixture(scope="module")
def predictor() -> SamPredictor:
    return SamPredictor(build_sam("tiny", pretrained=True))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def centre(mask: np.ndarray) -> tuple[float, float]:
    y, x = np.unravel_index(ndimage.distance_transform_edt(mask).argmax(), mask.shape)
    return float(x), float(y)


def test_review_keeps_corrects_deletes_and_adds(predictor):
    scene = draw_cells(np.random.default_rng(4), 240, 320)
    truth = [m for m in scene.masks if m.sum() >= CFG.min_area]
    big = sorted(truth, key=lambda m: -m.sum())
    spurious = np.zeros((240, 320), dtype=bool)
    spurious[:20, :20] = True
    shrunk = ndimage.binary_erosion(big[1], iterations=3)  # a rough model mask of object 1
    model = {10: big[0].copy(), 11: shrunk, 12: spurious}
    points = {k: centre(m) for k, m in model.items()}
    review = review_image(predictor, scene.image, model, points, scene.masks, CFG)

    assert review.kept == [10], "an exact model mask is accepted as is"
    assert review.deleted == [12], "a mask matching no object goes"
    assert 0.5 <= iou(shrunk, big[1]) < CFG.accept_iou and list(review.corrected) == [11]
    assert len(review.added) == len(truth) - 2, "every other object is added"
    for mask in [review.corrected[11], *review.added]:
        best = max(iou(mask, t) for t in truth)
        assert best >= CFG.accept_iou - 0.1, "an accepted or painted mask is close to an object"
    assert 0 < review.clicks <= CFG.max_clicks * (len(truth) - 1)
    assert review.painted <= len(truth) - 1


@pytest.mark.slow
def test_the_click_budget_limits_what_gets_labelled(predictor):
    scene = draw_cells(np.random.default_rng(5), 240, 320)
    generous = review_image(predictor, scene.image, {}, {}, scene.masks, CFG)
    tight = AnnotatorConfig(**{**CFG.__dict__, "clicks_per_image": 8})
    short = review_image(predictor, scene.image, {}, {}, scene.masks, tight)
    assert short.clicks <= 8 < generous.clicks
    assert 0 < len(short.added) < len(generous.added)
    painted = [m for m in short.added if any(np.array_equal(m, t) for t in scene.masks)]
    assert len(painted) >= short.painted, "a painted object is exactly the object"
