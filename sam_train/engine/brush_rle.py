"""Label Studio's brush masks: its own run-length format (thi.ng's rle-pack), not COCO RLE.

A brush result's `value.rle` is a list of byte values holding a big-endian bit stream:

    header   32 bits   N, the number of values: H * W * 4 (the mask as row-major RGBA)
              5 bits   word size - 1 (values are 8-bit)
         4 x  4 bits   the four widths a run count may be written with, each - 1 (3, 4, 8, 16)
    records, until N values are out:
              1 bit    1 = one word repeated, 0 = a sequence of distinct words
              2 bits   which of the four count widths follows
              w bits   count - 1
              words    one word (repeated count times) or count words
    zero bits up to a whole byte.

Label Studio's editor writes every channel equal to the alpha it painted, and the SDK's
`mask2rle` writes 255 for foreground the same way, so one pixel is always a run of 4 equal values.
Both directions are vectorised: encoding lays out every field's bits at once; decoding finds where
every record starts by pointer doubling over "the record at bit p ends at bit q", then expands
all runs in one `np.repeat`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WORD_BITS = 8
COUNT_WIDTHS = (3, 4, 8, 16)  # what Label Studio and its SDK write; the decoder reads any in the header
HEADER_BITS = 32 + 5 + 4 * 4
FOREGROUND = 255
# The editor anti-aliases brush edges: a pixel belongs to the mask when the brush covered at least half of it.
ALPHA_THRESHOLD = 128
# The SDK pads with 1-8 zero bits, the editor with 0-7; any more than a spare byte is not padding.
MAX_PADDING_BITS = 15


def encode(mask: np.ndarray) -> list[int]:
    """H x W bool mask -> Label Studio brush RLE, byte for byte what label-studio-sdk's `mask2rle` writes."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"brush RLE encodes a 2-D bool mask, got {_describe(mask)}")
    if mask.size == 0:
        raise ValueError(f"brush RLE cannot encode an empty {mask.shape[0]}x{mask.shape[1]} mask")
    num = mask.size * 4
    if num >= 2**32:
        raise ValueError(f"a {mask.shape[0]}x{mask.shape[1]} mask has more than the 2**32 values a brush RLE can count")
    flat = mask.ravel()  # row-major, like the canvas Label Studio draws on
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    lengths = np.diff(np.append(starts, flat.size)) * 4  # 4 channels per pixel: every run is >= 4, so a repeat
    values = np.where(flat[starts], FOREGROUND, 0)
    # A count field of w bits holds counts up to 2**w. Runs longer than the widest go out in chunks
    # of that and a remainder; like the SDK, every chunk of a run too long for the third width uses
    # the widest, even a short remainder.
    capacity = 2 ** np.asarray(COUNT_WIDTHS, dtype=np.int64)  # 8, 16, 256, 65536
    long = lengths > capacity[2]
    chunks = np.where(long, -(-lengths // capacity[3]), 1)
    run = np.repeat(np.arange(lengths.size), chunks)
    chunk = np.arange(run.size) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    counts = np.where(chunk < chunks[run] - 1, capacity[3], lengths[run] - chunk * capacity[3])
    which = np.where(long[run], 3, np.searchsorted(capacity[:3], counts))  # the narrowest width that holds it
    record_values = np.stack([np.ones_like(counts), which, counts - 1, values[run]], axis=1)  # R x 4 fields
    record_widths = np.stack([np.ones_like(counts), np.full_like(counts, 2), np.asarray(COUNT_WIDTHS)[which],
                              np.full_like(counts, WORD_BITS)], axis=1)
    header_values = [num, WORD_BITS - 1, *(w - 1 for w in COUNT_WIDTHS)]
    header_widths = [32, 5, 4, 4, 4, 4]
    return _pack(np.concatenate([header_values, record_values.ravel()]).astype(np.int64),
                 np.concatenate([header_widths, record_widths.ravel()]).astype(np.int64))


def decode(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> H x W bool mask of the pixels whose alpha is at least half opaque.

    Raises ValueError saying what is wrong: not bytes, a header for another image size, a word
    size other than 8 bits, a stream cut short, runs past the image's end, or trailing data.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"brush RLE needs a positive image size, got {height}x{width}")
    data = _as_bytes(rle)
    total_bits = data.size * 8
    if total_bits < HEADER_BITS:
        raise ValueError(f"brush RLE of {data.size} bytes is shorter than its {HEADER_BITS}-bit header")
    buffer = np.concatenate([data, np.zeros(8, np.uint8)])  # reads near the end see zeros, not an IndexError
    num, word_minus_1, *widths_minus_1 = (int(v) for v in _read(buffer, np.asarray([0, 32, 37, 41, 45, 49]),
                                                               np.asarray([32, 5, 4, 4, 4, 4])))
    expected = height * width * 4
    if num != expected:
        raise ValueError(
            f"brush RLE holds {num} values but a {height}x{width} image needs {expected} (4 per pixel): "
            "it was drawn on an image of another size"
        )
    if word_minus_1 + 1 != WORD_BITS:
        raise ValueError(f"brush RLE words are {word_minus_1 + 1} bits; RGBA masks use {WORD_BITS}")
    count_widths = np.asarray(widths_minus_1) + 1
    # At worst every value is a record of its own; anything longer is not this image's mask, and the
    # per-bit arrays below must stay proportional to the image.
    longest = HEADER_BITS + num * (3 + int(count_widths.max()) + WORD_BITS) + MAX_PADDING_BITS
    if total_bits > longest:
        raise ValueError(f"brush RLE of {data.size} bytes is longer than any stream for a {height}x{width} image")

    # Where the record starting at every bit position would end: one vectorised pass.
    position = np.arange(total_bits, dtype=np.int64)
    repeat = _read(buffer, position, 1) == 1
    count_width = count_widths[_read(buffer, position + 1, 2)]
    count = _read(buffer, position + 3, count_width) + 1
    end = position + 3 + count_width + np.where(repeat, WORD_BITS, count * WORD_BITS)
    starts = _chain(np.append(np.minimum(end, total_bits), total_bits), HEADER_BITS)

    produced = np.cumsum(count[starts])
    last = int(np.searchsorted(produced, num))  # the record that brings the total to num
    if last == starts.size or end[starts[last]] > total_bits:
        done = int(produced[last - 1]) if last else 0
        raise ValueError(f"brush RLE stops after {done} of its {num} values: the data is cut short")
    if produced[last] != num:
        covered = int(produced[last])
        raise ValueError(f"brush RLE runs cover {covered} values, more than the {num} of a {height}x{width} image")
    spare = total_bits - int(end[starts[last]])
    if spare > MAX_PADDING_BITS:
        raise ValueError(f"brush RLE has {spare // 8} bytes of data after its last run")

    starts = starts[: last + 1]
    words = np.where(repeat[starts], 1, count[starts])  # words each record stores
    first_word = starts + 3 + count_width[starts]
    word_index = np.arange(int(words.sum())) - np.repeat(np.cumsum(words) - words, words)
    word_values = _read(buffer, np.repeat(first_word, words) + word_index * WORD_BITS, WORD_BITS).astype(np.uint8)
    copies = np.repeat(np.where(repeat[starts], count[starts], 1), words)
    values = np.repeat(word_values, copies)  # N: the RGBA image
    return values.reshape(height, width, 4)[:, :, 3] >= ALPHA_THRESHOLD


def _pack(values: np.ndarray, widths: np.ndarray) -> list[int]:
    """Fields (value, bit width) -> big-endian bit stream as byte values, zero-padded like the SDK."""
    total = int(widths.sum())
    field = np.repeat(np.arange(widths.size), widths)
    shift = np.cumsum(widths)[field] - 1 - np.arange(total)  # a bit's place counted from its field's low end
    bits = ((values[field] >> shift) & 1).astype(np.uint8)
    padding = 8 - total % 8  # the SDK always pads, a whole zero byte when the stream ends on a byte
    return np.packbits(np.concatenate([bits, np.zeros(padding, np.uint8)])).tolist()


def _read(buffer: np.ndarray, position: np.ndarray, width: np.ndarray | int) -> np.ndarray:
    """Unsigned big-endian fields of up to 32 bits starting at bit `position` (vectorised over positions)."""
    byte = position >> 3
    window = np.zeros(position.shape, np.int64)
    for k in range(5):  # 40 bits cover any 32-bit field at any offset within its first byte
        window = (window << 8) | buffer[byte + k]
    return (window >> (40 - (position & 7) - width)) & ((np.int64(1) << width) - 1)


def _chain(jump: np.ndarray, start: int) -> np.ndarray:
    """start, jump[start], jump[jump[start]], ... up to the sentinel `len(jump) - 1`, by pointer doubling.

    Each round doubles the known prefix of the chain with a jump table that itself doubles its
    stride, so a stream of R records takes log2(R) vectorised rounds instead of R Python steps.
    """
    sentinel = jump.size - 1
    chain = np.asarray([start], dtype=np.int64)
    while chain[-1] < sentinel:
        chain = np.concatenate([chain, jump[chain]])
        jump = jump[jump]
    return chain[chain < sentinel]


def _as_bytes(rle: Sequence[int]) -> np.ndarray:
    if isinstance(rle, (str, bytes, dict)) or not isinstance(rle, (Sequence, np.ndarray)):
        raise ValueError(f"brush RLE must be a list of byte values, got {type(rle).__name__}")
    array = np.asarray(rle)
    if array.size == 0:
        return np.zeros(0, np.uint8)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"brush RLE must be a flat list of integers, got {_describe(array)}")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"brush RLE values must be bytes 0-255, found {int(array.min())}..{int(array.max())}")
    return array.astype(np.uint8)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return type(value).__name__
