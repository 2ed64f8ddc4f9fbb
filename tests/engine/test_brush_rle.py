"""Our brush-RLE codec against itself and against label-studio-sdk's converter (run in Label Studio's venv)."""

from __future__ import annotations

import numpy as np
import pytest

from sam_train.engine import brush_rle

# The SDK side: mask2rle of each mask (0/255, as Label Studio paints), encode_rle of raw RGBA
# values, and decode_rle of the streams we made, alpha channel only.
SDK_SCRIPT = """
import json, sys
import numpy as np
from label_studio_sdk.converter import brush
request = json.load(sys.stdin)
json.dump({
    "mask2rle": [brush.mask2rle(np.asarray(m, np.uint8) * 255) for m in request["masks"]],
    "encode_rle": [brush.encode_rle(np.asarray(v)) for v in request["rgba"]],
    "alpha": [brush.decode_rle(r)[3::4].tolist() for r in request["ours"]],
}, sys.stdout)
"""


def disk(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def sample_masks() -> list[np.ndarray]:
    """Masks covering every code path: empty, full, holes, edges, single pixels, runs over 256 and 2**16."""
    rng = np.random.default_rng(0)
    ring = disk(40, 50, 20, 25, 15) & ~disk(40, 50, 20, 25, 6)  # a hole
    edges = np.zeros((17, 23), bool)
    edges[0, :] = edges[-1, :] = edges[:, 0] = edges[:, -1] = True
    pixel = np.zeros((9, 11), bool)
    pixel[4, 5] = True
    corner = np.zeros((9, 11), bool)
    corner[-1, -1] = True
    long_runs = np.zeros((300, 450), bool)  # 135000 px: background runs far beyond one 2**16 chunk
    long_runs[150:151, :] = True
    exactly_chunk = np.ones((128, 128), bool)  # 4 x 16384 = 2**16 values: exactly one widest record
    return [
        np.zeros((5, 7), bool), np.ones((5, 7), bool), np.zeros((300, 400), bool), np.ones((300, 400), bool),
        ring, edges, pixel, corner, long_runs, exactly_chunk, np.ones((1, 1), bool), np.zeros((1, 9), bool),
        np.ones((9, 1), bool), rng.random((13, 17)) > 0.5, rng.random((64, 80)) > 0.9, disk(65, 65, 32, 32, 20),
        np.ones((64, 256), bool), np.ones((16, 1024), bool) & (np.arange(1024) < 1000),
    ]


def test_round_trip() -> None:
    for mask in sample_masks():
        assert np.array_equal(brush_rle.decode(brush_rle.encode(mask), *mask.shape), mask), mask.shape


@pytest.fixture(scope="module")
def sdk(run_in_label_studio_venv) -> dict:
    """The SDK's answers for sample_masks, RGBA literals, and our encodings of sample_masks."""
    masks = sample_masks()
    rgba = [
        [10, 20, 30, 200] * 3 + [0] * 8 + [9, 9, 9, 250] * 5 + [255] * 40,  # distinct words: literal records; 20 px
        [255, 255, 255, 127] + [128] * 4 + [0] * 4 + [1] * 4,  # alpha just under / at / above the threshold
    ]
    reply = run_in_label_studio_venv(SDK_SCRIPT, {
        "masks": [m.astype(int).tolist() for m in masks],
        "rgba": rgba,
        "ours": [brush_rle.encode(m) for m in masks],
    })
    return {"masks": masks, "rgba": rgba, **reply}


def test_encode_matches_sdk_byte_for_byte(sdk: dict) -> None:
    for mask, theirs in zip(sdk["masks"], sdk["mask2rle"]):
        assert brush_rle.encode(mask) == theirs, mask.shape


def test_sdk_decodes_ours(sdk: dict) -> None:
    for mask, alpha in zip(sdk["masks"], sdk["alpha"]):
        assert np.array_equal(np.asarray(alpha).reshape(mask.shape), np.where(mask, 255, 0)), mask.shape


def test_we_decode_sdk_streams(sdk: dict) -> None:
    for mask, theirs in zip(sdk["masks"], sdk["mask2rle"]):
        assert np.array_equal(brush_rle.decode(theirs, *mask.shape), mask), mask.shape
    # Literal records (distinct words) and partial alphas, as an anti-aliased brush edge leaves them.
    literal, partial = sdk["encode_rle"]
    assert brush_rle.decode(literal, 1, 20).tolist() == [[True] * 3 + [False] * 2 + [True] * 15]
    assert brush_rle.decode(partial, 1, 4).tolist() == [[False, True, False, False]]  # alpha 127, 128, 0, 1


def test_rejects_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="2-D bool"):
        brush_rle.encode(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="2-D bool"):
        brush_rle.encode(np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="empty 0x4"):
        brush_rle.encode(np.zeros((0, 4), bool))


def test_decode_names_what_is_wrong() -> None:
    mask = disk(20, 30, 10, 12, 6)
    good = brush_rle.encode(mask)
    with pytest.raises(ValueError, match="another size"):
        brush_rle.decode(good, 21, 30)  # (a transposed 30 x 20 has as many values: the result size catches that)
    with pytest.raises(ValueError, match="shorter than its 53-bit header"):
        brush_rle.decode(good[:5], 20, 30)
    with pytest.raises(ValueError, match="cut short"):
        brush_rle.decode(good[:-4], 20, 30)
    with pytest.raises(ValueError, match="2 bytes of data after its last run"):
        brush_rle.decode(good + [0, 0], 20, 30)
    with pytest.raises(ValueError, match="bytes 0-255"):
        brush_rle.decode([*good[:-1], 256], 20, 30)
    with pytest.raises(ValueError, match="list of byte values"):
        brush_rle.decode("garbage", 20, 30)
    with pytest.raises(ValueError, match="flat list of integers"):
        brush_rle.decode([1.5] * 10, 20, 30)
    with pytest.raises(ValueError, match="words are 16 bits"):
        brush_rle.decode([*good[:4], good[4] | 0b01000000, *good[5:]], 20, 30)  # word size field 7 -> 15
    # Header says 20 values (a 1x5 image) but the one run of an empty 2x3 mask is 24 long.
    overshoot = brush_rle.encode(np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="cover 24 values, more than the 20"):
        brush_rle.decode([*(20).to_bytes(4, "big"), *overshoot[4:]], 1, 5)
    with pytest.raises(ValueError, match="longer than any stream for a 1x1 image"):
        brush_rle.decode(brush_rle.encode(np.ones((1, 1), bool)) + [0] * 100, 1, 1)
    with pytest.raises(ValueError, match="positive image size"):
        brush_rle.decode(good, 0, 30)
