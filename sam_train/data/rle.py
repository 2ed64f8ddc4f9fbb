"""COCO run-length masks: encode with pycocotools, decode straight to a resampled grid.

At ~100 masks per SA-1B image, decoding every RLE at full size (3.4 MP each) and resizing is the
whole CPU cost of a naive loader. Here a mask is decoded directly onto the sample grid it is
needed at: the run boundaries (a few thousand numbers) are mapped onto the output grid and a
parity scan over the *output* pixels rebuilds it, so the cost scales with the output size and
the number of runs, never with the source resolution.
"""

from __future__ import annotations

import numpy as np
import torch
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
    (outside the source: background) only before or after the valid ones. Written in torch so
    the same code rasterises on a DataLoader worker's CPU or on the training GPU.
    """

    def __init__(self, height: int, rows: torch.Tensor | np.ndarray, cols: torch.Tensor | np.ndarray) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long)
        cols = torch.as_tensor(cols, dtype=torch.long, device=rows.device)
        self.device = rows.device
        self.height = height
        self.shape = (rows.numel(), cols.numel())
        row_ok, col_ok = torch.nonzero(rows >= 0).flatten(), torch.nonzero(cols >= 0).flatten()
        self.empty = row_ok.numel() == 0 or col_ok.numel() == 0
        if self.empty:
            return
        self.window = (slice(int(row_ok[0]), int(row_ok[-1]) + 1), slice(int(col_ok[0]), int(col_ok[-1]) + 1))
        # Upsampling repeats source rows/columns: decode each distinct one once, then repeat.
        r, self.row_repeat = torch.unique(rows[row_ok], return_inverse=True)
        c, self.col_repeat = torch.unique(cols[col_ok], return_inverse=True)
        self._cols = c
        self.repeats = r.numel() < row_ok.numel() or c.numel() < col_ok.numel()
        self.distinct_shape = (c.numel(), r.numel())
        # First distinct sampled column >= each source column, first sampled row >= each source row.
        self._col_at_or_after = torch.searchsorted(c, torch.arange(int(c[-1]) + 2, device=self.device))
        self._row_at_or_after = torch.searchsorted(r, torch.arange(height + 1, device=self.device))

    @classmethod
    def resize(cls, height: int, width: int, out_height: int, out_width: int) -> "SampleGrid":
        """Nearest-neighbour grid resizing height x width to out_height x out_width."""
        rows = sample_grid(height, (np.arange(out_height) + 0.5) * height / out_height)
        cols = sample_grid(width, (np.arange(out_width) + 0.5) * width / out_width)
        return cls(height, rows, cols)

    def first_sample_at_or_after(self, positions: torch.Tensor) -> torch.Tensor:
        """Column-major index, among the distinct sampled pixels, of the first one at or after each source position.

        A searchsorted over all sampled positions, in O(1) per query from the grid's structure.
        """
        col, row = torch.div(positions, self.height, rounding_mode="floor"), positions % self.height
        col = col.clamp(max=self._col_at_or_after.numel() - 1)
        j = self._col_at_or_after[col]
        exact = (j < self.distinct_shape[0]) & (self._cols[j.clamp(max=self.distinct_shape[0] - 1)] == col)
        i = torch.where(exact, self._row_at_or_after[row], 0)
        rows_per_col = self.distinct_shape[1]
        past_column = i == rows_per_col  # after the last sampled row: the next column's first
        return torch.where(past_column, (j + 1) * rows_per_col, j * rows_per_col + i)

    def decode_batch(self, counts: torch.Tensor | np.ndarray, offsets: torch.Tensor | np.ndarray) -> torch.Tensor:
        """K masks at once from `batch_counts` output -> K x `shape` bool tensor, in one vectorised pass."""
        counts = torch.as_tensor(counts, dtype=torch.long, device=self.device)
        offsets = torch.as_tensor(offsets, dtype=torch.long, device=self.device)
        k = offsets.numel() - 1
        out = torch.zeros((k, *self.shape), dtype=torch.bool, device=self.device)
        if self.empty or k == 0:
            return out
        n = self.distinct_shape[0] * self.distinct_shape[1]
        runs_per_mask = offsets.diff()
        # Boundaries (run starts after the first) of each mask, in source positions.
        mask_of = torch.repeat_interleave(torch.arange(k, device=self.device), runs_per_mask)
        total = counts.cumsum(0)
        ends = total - torch.cat([total.new_zeros(1), total])[offsets[:-1]][mask_of]  # run ends within each mask
        is_last = torch.zeros(counts.numel(), dtype=torch.bool, device=self.device)
        is_last[offsets[1:][runs_per_mask > 0] - 1] = True
        boundaries, owner = ends[~is_last], mask_of[~is_last]
        # Re-express the runs on the output grid: each boundary moves to the first sample at or
        # after it (runs that fall between two samples shrink to length 0), then expand.
        edges = self.first_sample_at_or_after(boundaries)
        per_mask = torch.bincount(owner, minlength=k)
        fence = torch.zeros(edges.numel() + 2 * k, dtype=torch.long, device=self.device)  # per mask: 0, edges..., n
        fence[torch.arange(edges.numel(), device=self.device) + 2 * owner + 1] = edges
        mask_ends = (per_mask + 2).cumsum(0) - 1
        fence[mask_ends] = n
        lengths = fence.diff()
        keep = torch.ones(lengths.numel(), dtype=torch.bool, device=self.device)
        keep[mask_ends[:-1]] = False  # the step from one mask's n to the next mask's 0
        lengths = lengths[keep]
        starts = (per_mask + 1).cumsum(0) - (per_mask + 1)
        run_index = torch.arange(lengths.numel(), device=self.device) - torch.repeat_interleave(starts, per_mask + 1)
        parity = (run_index & 1).bool()  # runs alternate background/foreground
        values = torch.repeat_interleave(parity, lengths, output_size=k * n).view(k, *self.distinct_shape).transpose(1, 2)
        if self.repeats:
            values = values[:, self.row_repeat][:, :, self.col_repeat]
        out[(slice(None), *self.window)] = values
        return out
