"""Prompt encoder: shapes, padding, box corners, and equality with Meta's module."""

from __future__ import annotations

import pytest
import torch

TOL = 1e-5


def _points(batch: int, n: int, size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(batch, n, 2, generator=g) * size
    labels = torch.randint(0, 2, (batch, n), generator=g)
    return coords, labels


def test_shapes_for_every_prompt_kind(tiny_pair):
    encoder = tiny_pair[0].prompt_encoder
    coords, labels = _points(batch=5, n=3)
    boxes = torch.tensor([[10.0, 20, 100, 120]]).expand(5, 4)
    masks = torch.randn(5, 1, 64, 64)

    sparse, dense = encoder(points=(coords, labels), boxes=None, masks=None)
    assert sparse.shape == (5, 4, 128)  # 3 points + the padding point
    assert dense.shape == (5, 128, 16, 16)
    sparse, dense = encoder(points=(coords, labels), boxes=boxes, masks=masks)
    assert sparse.shape == (5, 3 + 2, 128)  # no padding point when a box follows
    assert dense.shape == (5, 128, 16, 16)
    sparse, _ = encoder(points=None, boxes=boxes, masks=None)
    assert sparse.shape == (5, 2, 128)
    sparse, dense = encoder(points=None, boxes=None, masks=masks)
    assert sparse.shape == (5, 0, 128) and dense.shape == (5, 128, 16, 16)
    assert encoder.get_dense_pe().shape == (1, 128, 16, 16)


@pytest.mark.parametrize("kind", ["points", "box", "points_and_box", "mask", "nothing"])
def test_matches_meta(tiny_pair, kind):
    ours, meta = (m.prompt_encoder for m in tiny_pair)
    coords, labels = _points(batch=4, n=5)
    labels[0, -2:] = -1  # padded entries, as a batch of prompts with different point counts has
    kwargs = dict(
        points=(coords, labels) if "points" in kind else None,
        boxes=torch.tensor([[10.0, 20, 100, 120], [0, 0, 255, 255], [50, 60, 70, 80], [5, 5, 6, 6]]) if "box" in kind else None,
        masks=torch.randn(4, 1, 64, 64) if kind == "mask" else None,
    )
    for got, want in zip(ours(**kwargs), meta(**kwargs)):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.get_dense_pe(), meta.get_dense_pe(), atol=TOL, rtol=0)


def test_box_corner_labels_embed_like_boxes(tiny_pair):
    encoder = tiny_pair[0].prompt_encoder
    boxes = torch.tensor([[10.0, 20, 100, 120], [3, 4, 200, 210]])
    as_points = encoder.embed_points(boxes.reshape(-1, 2, 2), torch.tensor([[2, 3], [2, 3]]), pad=False)
    assert torch.equal(as_points, encoder.embed_boxes(boxes))


def test_padding_point_ignores_its_coordinates(tiny_pair):
    encoder = tiny_pair[0].prompt_encoder
    coords, labels = _points(batch=1, n=2)
    labels[0, 1] = -1
    moved = coords.clone()
    moved[0, 1] = torch.tensor([200.0, 3.0])
    a = encoder.embed_points(coords, labels, pad=True)
    b = encoder.embed_points(moved, labels, pad=True)
    assert torch.equal(a, b)
    assert torch.equal(a[0, 1], encoder.not_a_point_embed.weight[0])
