"""COCO run-length masks: encode with pycocotools, decode straight to a resampled grid.

At ~100 masks per SA-1B image, decoding every RLE at full size (3.4 MP each) and resizing is the
whole CPU cost of a naive loader. Here a mask is decoded directly onto the sample grid it is
needed at: the run boundaries (a few thousand numbers) are mapped onto the output grid and a
parity scan over the *output* pixels rebuilds it, so the cost scales with the output size and
the number of runs, never with the source resolution.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


class RLEError(ValueError):
    """An RLE that cannot describe a mask of its stated size."""


def encode(mask: np.ndarray) -> dict:
    """H x W bool mask -> COCO compressed RLE `{"size": [h, w], "counts": str}`."""
    # A Fortran-ordered bool mask (as draw_scene makes) is encoded without a copy.
    as_bytes = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(as_bytes))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_counts(rle: dict) -> np.ndarray:
    """Run lengths of a COCO RLE (compressed string or uncompressed list), as int64.

    Runs alternate background/foreground starting with background, column-major (Fortran) order.
    The compressed form is the LEB128-like code of pycocotools' `rleFrString`, decoded vectorised.
    """
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    if not isinstance(counts, (str, bytes)):
        raise RLEError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
    raw = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else counts, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    chars = raw.astype(np.int64) - 48
    if chars.min() < 0 or chars.max() > 63:
        raise RLEError("RLE counts string holds characters outside the COCO alphabet")
    last = np.flatnonzero((chars & 0x20) == 0)  # the final character of each number
    if last.size == 0 or last[-1] != chars.size - 1:
        raise RLEError("RLE counts string ends in the middle of a number")
    first = np.concatenate([[0], last[:-1] + 1])
    width = last - first + 1
    position = np.arange(chars.size) - np.repeat(first, width)
    values = np.add.reduceat((chars & 0x1F) << (5 * position), first)
    negative = (chars[last] & 0x10) != 0
    values = np.where(negative, values | (-1 << (5 * width)), values)
    # From the 4th number on, each is stored as a delta to the number two places before it.
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def validated_counts(rle: dict, height: int, width: int) -> np.ndarray:
    """Run lengths of `rle`, checked against the image it should cover; raises RLEError naming the problem."""
    size = rle.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise RLEError(f"RLE has no [height, width] size (got {size!r})")
    if (int(size[0]), int(size[1])) != (height, width):
        raise RLEError(f"RLE size {int(size[0])}x{int(size[1])} does not match the image's {height}x{width}")
    counts = rle_counts(rle)
    if counts.size and counts.min() < 0:
        raise RLEError("RLE has a negative run length")
    if int(counts.sum()) != height * width:
        raise RLEError(f"RLE runs cover {int(counts.sum())} pixels, the image has {height * width}")
    return counts


def sample_grid(src_size: int, positions: np.ndarray) -> np.ndarray:
    """Nearest source index of each sample position (in source pixel units); -1 when outside."""
    index = np.floor(positions).astype(np.int64)
    return np.where((positions >= 0) & (index < src_size), index, -1)


class SampleGrid:
    """Which source pixel each output pixel reads: the part of decoding shared by all masks of an image.

    `rows[i]`/`cols[j]` are non-decreasing source indices (a resize, crop or upsample), with -1
    (outside the source: background) only before or after the valid ones.
    """

    def __init__(self, height: int, rows: np.ndarray, cols: np.ndarray) -> None:
        self.height = height
        self.shape = (rows.size, cols.size)
        row_ok, col_ok = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
        self.empty = row_ok.size == 0 or col_ok.size == 0
        if self.empty:
            return
        self.window = (slice(row_ok[0], row_ok[-1] + 1), slice(col_ok[0], col_ok[-1] + 1))
        # Upsampling repeats source rows/columns: decode each distinct one once, then repeat.
        r, self.row_repeat = np.unique(rows[row_ok], return_inverse=True)
        c, self.col_repeat = np.unique(cols[col_ok], return_inverse=True)
        self.repeats = r.size < row_ok.size or c.size < col_ok.size
        self.distinct_shape = (c.size, r.size)
        # Column-major source position of every distinct sampled pixel: strictly increasing.
        self.positions = (c[:, None] * height + r[None, :]).ravel()

    @classmethod
    def resize(cls, height: int, width: int, out_height: int, out_width: int) -> "SampleGrid":
        """Nearest-neighbour grid resizing height x width to out_height x out_width."""
        rows = sample_grid(height, (np.arange(out_height) + 0.5) * height / out_height)
        cols = sample_grid(width, (np.arange(out_width) + 0.5) * width / out_width)
        return cls(height, rows, cols)

    def decode(self, counts: np.ndarray) -> np.ndarray:
        """Mask values at the grid's sample pixels, from validated run lengths -> bool array of `shape`."""
        out = np.zeros(self.shape, dtype=bool)
        if self.empty or counts.size < 2:
            return out
        boundaries = np.cumsum(counts[:-1])  # a new run starts at each boundary
        # Re-express the runs on the output grid: each boundary moves to the first sample at or
        # after it (runs that fall between two samples shrink to length 0), then expand.
        edges = np.searchsorted(self.positions, boundaries, side="left")
        lengths = np.diff(edges, prepend=0, append=self.positions.size)
        parity = (np.arange(lengths.size) & 1).astype(bool)  # runs alternate background/foreground
        values = np.repeat(parity, lengths).reshape(self.distinct_shape).T
        if self.repeats:
            values = values[self.row_repeat][:, self.col_repeat]
        out[self.window] = values
        return out


def decode_resized(rle: dict, out_height: int, out_width: int) -> np.ndarray:
    """Decode `rle` directly at out_height x out_width (nearest-neighbour resampling)."""
    height, width = int(rle["size"][0]), int(rle["size"][1])
    counts = validated_counts(rle, height, width)
    return SampleGrid.resize(height, width, out_height, out_width).decode(counts)
