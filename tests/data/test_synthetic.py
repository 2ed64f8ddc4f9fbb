"""Synthetic scenes: deterministic, nested whole/part/subpart masks, occlusion respected."""

from __future__ import annotations

import numpy as np

from sam_train.data.synthetic import LEVELS, draw_scene


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
