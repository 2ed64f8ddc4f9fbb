"""Click-based evaluation: where the protocol clicks, and what the interactive evaluation reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from sam_train.data.pipeline import SampleConfig, collate, decode_sample, expand_batch, sample_rng
from sam_train.data.shards import iter_raw_samples, resolve_shards
from sam_train.evaluation import batch_metrics, evaluate_clicks
from sam_train.prompts.protocol import next_click
from sam_train.model import Sam, build_sam
from sam_train.visualize import draw_session

STRIDE = 4


def grid(*blocks: tuple[int, int, int, int], size: int = 24) -> torch.Tensor:
    """A size x size bool mask with the given (row0, row1, col0, col1) blocks set."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    for r0, r1, c0, c1 in blocks:
        mask[r0:r1, c0:c1] = True
    return mask


def click(predicted: torch.Tensor, target: torch.Tensor) -> tuple[tuple[int, int], int]:
    """next_click on one mask -> ((x, y) grid cell, label)."""
    points, labels = next_click(predicted[None], target[None], STRIDE)
    x, y = (points[0] / STRIDE - 0.5).tolist()
    assert float(x).is_integer() and float(y).is_integer(), "clicks sit at cell centres"
    return (int(x), int(y)), int(labels[0])


def boundary_distance(region: np.ndarray) -> np.ndarray:
    """Brute force: each cell's distance to the nearest cell outside `region`, cells beyond the grid included."""
    padded = np.pad(region, 1)
    outside = np.argwhere(~padded)
    distance = np.zeros(region.shape)
    for y, x in np.argwhere(region):
        distance[y, x] = np.sqrt(((outside - (y + 1, x + 1)) ** 2).sum(1)).min()
    return distance


def test_a_missed_region_gets_a_positive_click_at_its_centre():
    target = grid((2, 9, 2, 9), (15, 18, 15, 18))  # a 7 x 7 and a 3 x 3 object
    assert click(torch.zeros_like(target), target) == ((5, 5), 1)


def test_a_spurious_blob_gets_a_negative_click_at_its_centre():
    target = grid((2, 5, 2, 5))
    predicted = grid((2, 5, 2, 5), (10, 19, 11, 20))  # right, plus a spurious 9 x 9 blob
    assert click(predicted, target) == ((15, 14), 0)


def test_the_largest_region_is_chosen_by_area_not_by_depth():
    # A thin missed strip (2 x 30 = 60 cells) beats a deeper spurious square (7 x 7 = 49 cells),
    # where RITM's farthest-point-overall rule would pick the square.
    target = grid((2, 4, 1, 31), size=32)
    predicted = grid((10, 17, 10, 17), size=32)
    (x, y), label = click(predicted, target)
    assert label == 1 and target[y, x]


def test_the_grid_border_counts_as_boundary():
    target = grid((0, 5, 0, 5))  # a 5 x 5 object in the corner: its centre, not the corner, is farthest inside
    assert click(torch.zeros_like(target), target) == ((2, 2), 1)


def test_a_perfect_prediction_gets_a_positive_click_at_the_target_centre():
    target = grid((3, 10, 4, 11))
    assert click(target, target) == ((7, 6), 1)
    nothing = torch.zeros(25, 25, dtype=torch.bool)  # nothing to find, nothing found: a negative click mid-grid
    assert click(nothing, nothing) == ((12, 12), 0)


def test_a_batch_clicks_each_mask_on_its_own_in_its_largest_region_farthest_from_the_boundary():
    generator = torch.Generator().manual_seed(0)
    blobs = lambda: torch.nn.functional.max_pool2d(  # noqa: E731
        (torch.rand(12, 1, 32, 32, generator=generator) > 0.97).float(), 7, 1, 3)[:, 0] > 0
    targets, predicted = blobs(), blobs()
    points, labels = next_click(predicted, targets, STRIDE)
    for i in range(len(targets)):  # the same as one mask at a time: regions never join across masks
        alone = next_click(predicted[i : i + 1], targets[i : i + 1], STRIDE)
        assert torch.equal(alone[0][0], points[i]) and alone[1][0] == labels[i]
        # Missed and spurious cells form separate regions: a click is either positive or negative.
        missed, _ = ndimage.label((targets[i] & ~predicted[i]).numpy())
        spurious, _ = ndimage.label((predicted[i] & ~targets[i]).numpy())
        largest = max(np.bincount(missed.ravel())[1:].max(initial=0), np.bincount(spurious.ravel())[1:].max(initial=0))
        x, y = (points[i] / STRIDE - 0.5).long().tolist()
        regions = missed if labels[i] == 1 else spurious  # positive on a missed cell, negative on a spurious one
        assert regions[y, x] > 0 and (regions == regions[y, x]).sum() == largest
        distance = boundary_distance(regions == regions[y, x])
        assert distance[y, x] == pytest.approx(distance.max())


def synth_batch(dataset, count: int = 2, max_masks: int = 8) -> dict:
    raws = [s for ref in resolve_shards([str(dataset)]) for s in iter_raw_samples(ref.url)][:count]
    cfg = SampleConfig(image_size=256, mask_stride=4, max_masks=max_masks)
    return expand_batch(collate([decode_sample(r, cfg, sample_rng(0, 0, r.key)) for r in raws]), 256)


def embed(model: Sam, batch: dict) -> torch.Tensor:
    images = (batch["images"].float() - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        return model.encode_image(images)


def test_a_random_model_reports_every_metric_in_range_and_clicks_follow_its_errors(synth_24):
    torch.manual_seed(0)
    model = build_sam("tiny").eval()
    batch = synth_batch(synth_24)
    targets, image_index = batch["masks"], batch["image_index"]
    embeddings = embed(model, batch)
    result = evaluate_clicks(model, embeddings, targets, image_index, [1, 3, 5])
    metrics = batch_metrics(result)
    names = [f"miou_{k}click{kind}" for k in (1, 3, 5) for kind in ("", "_oracle")]
    assert set(metrics) == {*names, "miou_box", "iou_mae"}
    assert all(0.0 <= float(v) <= 1.0 for v in metrics.values()), metrics
    for k in (1, 3, 5):  # the oracle picks among outputs that include the given one
        assert (result.iou[f"miou_{k}click_oracle"] >= result.iou[f"miou_{k}click"]).all()
    n = len(targets)
    assert result.clicks.shape == (n, 5, 2) and result.click_labels.shape == (n, 5) and result.masks.shape == targets.shape
    assert len(result.predicted_iou) == len(result.real_iou) == 4 * n  # 3 click counts and the box
    assert (result.click_labels[:, 0] == 1).all() and set(result.click_labels.unique().tolist()) <= {0, 1}
    assert ((result.clicks >= 0) & (result.clicks <= model.image_size)).all()
    # Click 1 is the target's centre; click 2 follows the error of the mask given after click 1.
    assert torch.equal(result.clicks[:, 0], next_click(torch.zeros_like(targets), targets, 4)[0])
    after_one = evaluate_clicks(model, embeddings, targets, image_index, [1])
    assert torch.equal(result.clicks[:, :1], after_one.clicks)
    assert torch.equal(result.clicks[:, 1], next_click(after_one.masks, targets, 4)[0])


def known_output_sam() -> Sam:
    """The tiny SAM with real weights that make every output constant whatever the prompt.

    Zeroing the last upscaling conv (bias 1) makes every decoder feature GELU(1); zeroing the
    last layer of each hypernetwork MLP leaves its bias as the mask weights, so output 0 (the
    single mask) and output 2 cover everything, outputs 1 and 3 nothing; the IoU head's last
    layer is reduced to its bias, which scores them 0.5, 0.9, 0.1, 0.2.
    """
    torch.manual_seed(0)
    model = build_sam("tiny").eval()
    decoder = model.mask_decoder
    with torch.no_grad():
        last_conv = decoder.output_upscaling[3]
        last_conv.weight.zero_()
        last_conv.bias.fill_(1.0)
        for sign, mlp in zip((1.0, -1.0, 1.0, -1.0), decoder.output_hypernetworks_mlps):
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(sign)
        decoder.iou_prediction_head.layers[-1].weight.zero_()
        decoder.iou_prediction_head.layers[-1].bias.copy_(torch.tensor([0.5, 0.9, 0.1, 0.2]))
    return model


def test_a_model_with_known_outputs_scores_exactly_as_the_protocol_says():
    model = known_output_sam()
    targets = torch.stack([grid((10, 20, 10, 30), size=64), grid((0, 64, 0, 16), size=64), grid((40, 41, 5, 6), size=64)])
    embeddings = torch.randn(1, 128, 16, 16)
    result = evaluate_clicks(model, embeddings, targets, torch.zeros(3, dtype=torch.long), [1, 3, 5])
    everything = targets.flatten(1).float().mean(1)  # IoU of an all-foreground mask
    iou = result.iou
    assert torch.equal(iou["miou_1click"], torch.zeros(3))  # the top-scored (0.9) of the 3 outputs is empty
    for name in ("miou_1click_oracle", "miou_3click", "miou_3click_oracle", "miou_5click", "miou_box"):
        assert torch.allclose(iou[name], everything), name  # the full masks: output 2, then the single output
    expected_mae = (0.9 * 3 + 3 * (0.5 - everything).abs().sum()) / 12
    assert float(batch_metrics(result)["iou_mae"]) == pytest.approx(float(expected_mae), abs=1e-6)
    # Empty after click 1: click 2 again at the object's centre; full after click 2: then negative
    # clicks at the centre of the background, the largest spurious region.
    first, _ = next_click(torch.zeros_like(targets), targets, 4)
    background, _ = next_click(torch.ones_like(targets), targets, 4)
    assert result.click_labels.tolist() == [[1, 1, 0, 0, 0]] * 3
    assert torch.equal(result.clicks[:, 1], first) and torch.equal(result.clicks[:, 2], background)
    assert result.masks.all()


def test_an_empty_click_list_evaluates_the_box_only():
    model = known_output_sam()
    targets = grid((10, 20, 10, 30), size=64)[None]
    result = evaluate_clicks(model, torch.randn(1, 128, 16, 16), targets, torch.zeros(1, dtype=torch.long), [])
    assert set(result.iou) == {"miou_box"} and result.clicks.shape == (1, 0, 2)


def test_the_session_overlay_colours_hits_misses_spurious_cells_and_clicks():
    image = np.full((32, 32, 3), 100, dtype=np.uint8)
    target, predicted = grid((0, 4, 0, 4), size=8).numpy(), grid((0, 4, 2, 6), size=8).numpy()
    out = draw_session(image, target, predicted, np.array([[2.0, 30.0]]), np.array([1]))
    assert out.shape == image.shape and out.dtype == np.uint8
    hit, missed, spurious, untouched = out[4, 12], out[4, 4], out[4, 20], out[20, 28]
    assert hit[2] > hit[0] and missed[0] > 150 and missed[1] > 150 and spurious[0] > spurious[2]
    assert untouched.tolist() == [100, 100, 100]
    assert out[30, 2].tolist() == [0, 255, 0]  # a positive click is green
    with pytest.raises(ValueError, match="do not tile"):
        draw_session(image, target[:5], predicted[:5], np.zeros((0, 2)), np.zeros(0))
