"""Synthetic scenes: deterministic, nested whole/part/subpart masks, occlusion respected."""

from __future__ import annotations

import numpy as np
import pytest

from sam_train.data.synth import synth_sample
from sam_train.data.synthetic import LEVELS, draw_cells, draw_scene


def test_same_seed_same_scene_other_seed_other_scene():
    a = draw_scene(np.random.default_rng(5), 100, 140)
    b = draw_scene(np.random.default_rng(5), 100, 140)
    c = draw_scene(np.random.default_rng(6), 100, 140)
    assert np.array_equal(a.image, b.image) and len(a.masks) == len(b.masks)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    assert not np.array_equal(a.image, c.image)


def test_masks_nest_inside_their_whole_object():
    scene = draw_scene(np.random.default_rng(0), 240, 320, num_objects=6)
    assert scene.image.shape == (240, 320, 3) and scene.image.dtype == np.uint8
    assert set(scene.levels) <= set(LEVELS) and {"whole", "part", "subpart"} <= set(scene.levels)
    wholes = {o: m for m, lvl, o in zip(scene.masks, scene.levels, scene.object_ids) if lvl == "whole"}
    for mask, level, obj in zip(scene.masks, scene.levels, scene.object_ids):
        assert mask.shape == (240, 320) and mask.any()
        if level != "whole" and obj in wholes:
            assert not (mask & ~wholes[obj]).any(), "a part or subpart must lie inside its object"


def test_visible_wholes_do_not_overlap():
    scene = draw_scene(np.random.default_rng(1), 200, 200, num_objects=8)
    wholes = [m for m, lvl in zip(scene.masks, scene.levels) if lvl == "whole"]
    coverage = np.sum(wholes, axis=0)
    assert coverage.max() == 1, "a pixel is visible on one object only (later objects occlude earlier)"


def test_cells_are_deterministic_nested_and_unlike_objects():
    a = draw_cells(np.random.default_rng(3), 200, 260)
    b = draw_cells(np.random.default_rng(3), 200, 260)
    assert np.array_equal(a.image, b.image) and len(a.masks) == len(b.masks) > 0
    assert set(a.levels) <= set(LEVELS)
    by_object: dict[int, list[tuple[str, np.ndarray]]] = {}
    for mask, level, obj in zip(a.masks, a.levels, a.object_ids):
        assert mask.shape == (200, 260) and mask.sum() >= 16
        by_object.setdefault(obj, []).append((level, mask))
    for members in by_object.values():
        parts = [m for lvl, m in members if lvl == "part"]
        union = np.any(parts, axis=0) if parts else None
        for level, mask in members:
            if level == "subpart":  # a nucleus lies inside a visible cell of its colony
                assert union is not None and not (mask & ~union).any()
            if level == "whole":  # a colony is exactly its visible cells
                assert np.array_equal(mask, union)
    # Another domain: glowing cells on a dark background, brighter than what surrounds them.
    background = ~np.any(a.masks, axis=0)
    assert a.image[background].mean() < 70 < a.image[~background].mean()


def test_synth_sample_styles_name_their_keys_and_reject_unknown_styles():
    key, members = synth_sample(1, 2, style="cells")
    assert key == "cells_1_00000002" and set(members) == {"jpg", "json"}
    assert synth_sample(1, 2)[0] == "synth_1_00000002"
    with pytest.raises(ValueError, match="unknown scene style 'aerial'"):
        synth_sample(1, 2, style="aerial")
