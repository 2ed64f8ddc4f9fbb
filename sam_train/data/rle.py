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


def encode(mask: np.ndarray) -> dict:
    """H x W bool mask -> COCO compressed RLE `{"size": [h, w], "counts": str}`."""
    # A Fortran-ordered bool mask (as draw_scene makes) is encoded without a copy.
    as_bytes = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(as_bytes))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


class RLEError(ValueError):
    """An RLE that cannot describe a mask of its stated size; `index` says which of a batch."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


def rle_counts(rle: dict) -> np.ndarray:
    """Run lengths of a COCO RLE (compressed string or uncompressed list), as int64.

    Runs alternate background/foreground starting with background, column-major (Fortran) order.
    """
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    return _decode_strings([_counts_bytes(counts, 0)])[0]


def batch_counts(rles: list[dict], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated run lengths of many RLEs of one image: (all runs concatenated, K+1 offsets).

    One vectorised pass over all masks instead of a Python-level loop per mask; raises RLEError
    whose `index` names the first bad RLE.
    """
    for i, rle in enumerate(rles):
        _check_size(rle, height, width, i)
    if all(not isinstance(rle["counts"], list) for rle in rles):
        counts, offsets = _decode_strings([_counts_bytes(rle["counts"], i) for i, rle in enumerate(rles)])
    else:  # uncompressed lists (rare: COCO crowds before conversion)
        parts = [rle_counts(rle) for rle in rles]
        counts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    owner = np.repeat(np.arange(len(rles)), np.diff(offsets))
    if counts.size and counts.min() < 0:
        raise RLEError("RLE has a negative run length", int(owner[np.argmin(counts)]))
    covered = np.bincount(owner, weights=counts, minlength=len(rles)).astype(np.int64)
    wrong = np.flatnonzero(covered != height * width)
    if wrong.size:
        i = int(wrong[0])
        raise RLEError(f"RLE runs cover {covered[i]} pixels, the image has {height * width}", i)
    return counts, offsets


def validated_counts(rle: dict, height: int, width: int) -> np.ndarray:
    """Run lengths of one RLE, checked against the image it should cover; raises RLEError naming the problem."""
    return batch_counts([rle], height, width)[0]


def _check_size(rle: dict, height: int, width: int, index: int) -> None:
    size = rle.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise RLEError(f"RLE has no [height, width] size (got {size!r})", index)
    if (int(size[0]), int(size[1])) != (height, width):
        raise RLEError(f"RLE size {int(size[0])}x{int(size[1])} does not match the image's {height}x{width}", index)


def _counts_bytes(counts: object, index: int) -> bytes:
    if isinstance(counts, str):
        return counts.encode("ascii", errors="replace")
    if isinstance(counts, bytes):
        return counts
    raise RLEError(f"RLE counts must be a string or a list, got {type(counts).__name__}", index)


def _decode_strings(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Decode compressed counts strings (pycocotools' `rleFrString` code) -> (runs, K+1 offsets).

    Each number is 5-bit groups, low first, with 0x20 = "more follows" and 0x10 on the last group
    = negative; from the 3rd number of a mask on, each is a delta to the number two places back.
    """
    char_offsets = np.concatenate([[0], np.cumsum([len(s) for s in strings])]).astype(np.int64)
    chars = np.frombuffer(b"".join(strings), dtype=np.uint8) - np.uint8(48)  # below '0' wraps past 63
    if chars.size and chars.max() > 63:
        bad = int(np.flatnonzero(chars > 63)[0])
        raise RLEError("RLE counts string holds characters outside the COCO alphabet", _owner(char_offsets, bad))
    terminal = (chars & 0x20) == 0
    ends = char_offsets[1:] - 1
    unfinished = np.flatnonzero((np.diff(char_offsets) > 0) & ~terminal[np.maximum(ends, 0)]) if chars.size else []
    if len(unfinished):
        raise RLEError("RLE counts string ends in the middle of a number", int(unfinished[0]))
    last = np.flatnonzero(terminal)  # final character of each number; never straddles masks
    first = np.concatenate([[0], last[:-1] + 1]).astype(np.int64)
    groups = last - first + 1
    # Numbers are a few characters long: add digit k of every number at once, k = 0, 1, ...
    digits = (chars & 0x1F).astype(np.int64)
    values = digits[first] if chars.size else np.zeros(0, np.int64)
    longer = np.flatnonzero(groups > 1)
    for k in range(1, int(groups.max(initial=1))):
        longer = longer[groups[longer] > k]
        values[longer] |= digits[first[longer] + k] << (5 * k)
    values = np.where((chars[last] & 0x10) != 0, values | (np.int64(-1) << (5 * groups)), values)
    numbers_per_string = np.diff(np.concatenate([[0], np.cumsum(terminal)])[char_offsets])
    offsets = np.concatenate([[0], np.cumsum(numbers_per_string)]).astype(np.int64)
    # Undo the deltas: number m >= 3 of a mask adds number m - 2. Sum every other number across
    # the whole array (both parities at once), then subtract what came before each mask's chain.
    position = np.arange(values.size)
    index = position - np.repeat(offsets[:-1], numbers_per_string)  # position within its mask
    chained = np.empty_like(values)
    chained[0::2], chained[1::2] = np.cumsum(values[0::2]), np.cumsum(values[1::2])
    chain_start = np.minimum(position - index + 2 - (index & 1), position)  # number 1 or 2 of the mask
    values = np.where(index >= 1, chained - chained[chain_start] + values[chain_start], values)
    return values, offsets


def _owner(offsets: np.ndarray, position: int) -> int:
    return int(np.searchsorted(offsets[1:], position, side="right"))


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
        self._cols = c
        self.repeats = r.size < row_ok.size or c.size < col_ok.size
        self.distinct_shape = (c.size, r.size)
        # Column-major source position of every distinct sampled pixel: strictly increasing.
        self.positions = (c[:, None] * height + r[None, :]).ravel()
        # First distinct sampled column >= each source column, first sampled row >= each source row.
        self._col_at_or_after = np.searchsorted(c, np.arange(int(c[-1]) + 2))
        self._row_at_or_after = np.searchsorted(r, np.arange(height + 1))

    def first_sample_at_or_after(self, positions: np.ndarray) -> np.ndarray:
        """Index into `self.positions` of the first sample at or after each source position.

        Equivalent to searchsorted on `self.positions`, in O(1) per query from the grid's structure.
        """
        col, row = np.divmod(positions, self.height)
        col = np.minimum(col, self._col_at_or_after.size - 1)
        j = self._col_at_or_after[col]
        i = np.where(self._sampled_col(j, col), self._row_at_or_after[row], 0)
        past_column = i == self.distinct_shape[1]  # after the last sampled row: next column's first
        return np.where(past_column, (j + 1) * self.distinct_shape[1], j * self.distinct_shape[1] + i)

    def _sampled_col(self, j: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Whether distinct column j is exactly source column `col` (else it lies beyond it)."""
        return (j < self.distinct_shape[0]) & (self._cols[np.minimum(j, self.distinct_shape[0] - 1)] == col)

    @classmethod
    def resize(cls, height: int, width: int, out_height: int, out_width: int) -> "SampleGrid":
        """Nearest-neighbour grid resizing height x width to out_height x out_width."""
        rows = sample_grid(height, (np.arange(out_height) + 0.5) * height / out_height)
        cols = sample_grid(width, (np.arange(out_width) + 0.5) * width / out_width)
        return cls(height, rows, cols)

    def decode(self, counts: np.ndarray) -> np.ndarray:
        """Mask values at the grid's sample pixels, from validated run lengths -> bool array of `shape`."""
        return self.decode_batch(counts, np.array([0, counts.size]))[0]

    def decode_batch(self, counts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """K masks at once from `batch_counts` output -> K x `shape` bool, in one vectorised pass."""
        k = offsets.size - 1
        if self.empty or k == 0:
            return np.zeros((k, *self.shape), dtype=bool)
        n = self.positions.size
        # Boundaries (run starts after the first) of each mask, in source positions.
        mask_of = np.repeat(np.arange(k), np.diff(offsets))
        total = np.cumsum(counts)
        ends = total - np.concatenate([[0], total])[offsets[:-1]][mask_of]  # run ends within each mask
        is_last = np.zeros(counts.size, dtype=bool)
        is_last[offsets[1:][np.diff(offsets) > 0] - 1] = True
        boundaries, owner = ends[~is_last], mask_of[~is_last]
        # Re-express the runs on the output grid: each boundary moves to the first sample at or
        # after it (runs that fall between two samples shrink to length 0), then expand.
        edges = self.first_sample_at_or_after(boundaries)
        per_mask = np.bincount(owner, minlength=k)
        fence = np.zeros(edges.size + 2 * k, dtype=np.int64)  # per mask: 0, its edges..., n
        slots = np.arange(edges.size) + 2 * owner + 1
        fence[slots] = edges
        mask_ends = np.cumsum(per_mask + 2) - 1
        fence[mask_ends] = n
        lengths = np.diff(fence)
        keep = np.ones(lengths.size, dtype=bool)
        keep[mask_ends[:-1]] = False  # the step from one mask's n to the next mask's 0
        lengths = lengths[keep]
        run_index = np.arange(lengths.size) - np.repeat(np.cumsum(per_mask + 1) - (per_mask + 1), per_mask + 1)
        parity = (run_index & 1).astype(bool)  # runs alternate background/foreground
        values = np.repeat(parity, lengths).reshape(k, *self.distinct_shape).transpose(0, 2, 1)
        if self.repeats:
            values = values[:, self.row_repeat][:, :, self.col_repeat]
        rows, cols = self.window
        out = np.empty((k, *self.shape), dtype=bool)
        out[:, rows, cols] = values
        # Zero only the margins outside the window (padding, cropped-away parts).
        out[:, : rows.start], out[:, rows.stop :] = False, False
        out[:, rows, : cols.start], out[:, rows, cols.stop :] = False, False
        return out


def decode_resized(rle: dict, out_height: int, out_width: int) -> np.ndarray:
    """Decode `rle` directly at out_height x out_width (nearest-neighbour resampling)."""
    height, width = int(rle["size"][0]), int(rle["size"][1])
    counts = validated_counts(rle, height, width)
    return SampleGrid.resize(height, width, out_height, out_width).decode(counts)
