"""Raw SA-1B sample (JPEG + JSON bytes) -> training sample: image canvas and its masks.

The costs that matter at ~100 masks per image are JPEG and RLE decoding, so the data worker
does only what needs a CPU: the JPEG is decoded at reduced scale (DCT scaling) when it is much
larger than the canvas, masks are filtered and sampled from their JSON fields before any is
decoded, and only the kept RLEs are decoded, to run lengths. Resizing the image onto its canvas
and rasterising the runs straight onto the loss-resolution grid (`rle.SampleGrid`, never at
full source size) happen once the batch is on the training device (`expand_batch`).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sam_train.data import rle
from sam_train.data.sa1b import parse_record
from sam_train.data.shards import RawSample
from sam_train.geometry import longest_side_shape


# Bump when the canvas an image becomes changes (placement, resizing, padding): embedding caches
# record it, and one made from older canvases is then refused instead of silently mismatched.
CANVAS_VERSION = 1


@dataclass(frozen=True)
class SampleConfig:
    """How raw samples become training samples; filled from `configs/data/*.yaml` (`sample:`)."""

    image_size: int = 1024  # square canvas side, the model's input size
    mask_stride: int = 4  # masks come out at image_size / mask_stride: the decoder's low-res logits
    max_masks: int = 64  # K masks sampled per image
    max_area_fraction: float = 0.9  # masks covering at least this much of the image are dropped
    min_mask_area: float = 16.0  # in canvas pixels at base scale; smaller masks are dropped
    min_predicted_iou: float = 0.0
    min_stability_score: float = 0.0
    jitter_scale: tuple[float, float] | None = None  # large-scale jitter range, e.g. (0.1, 2.0)
    hflip_prob: float = 0.0

    @property
    def mask_size(self) -> int:
        return self.image_size // self.mask_stride


@dataclass
class TrainSample:
    """One decoded image and its K masks in compact form, ready to collate.

    The worker does only what needs the CPU (JPEG and RLE-string decoding). Resizing the image
    onto its canvas and rasterising the masks from their runs happen after the batch reaches
    the training device (`expand_batch`): a GPU does both for free, while on the data worker they
    would cost a third of the sample's time.
    """

    key: str
    shard: str
    pixels: torch.Tensor  # h x w x 3 uint8: the decoded source region the canvas shows (unflipped)
    mask_runs: torch.Tensor  # run lengths of the K masks, concatenated (COCO RLE order)
    mask_offsets: torch.Tensor  # K + 1: mask k's runs are mask_runs[offsets[k]:offsets[k+1]]
    grid_rows: torch.Tensor  # m: source row each mask-grid row reads (-1: none), m = S / mask_stride
    grid_cols: torch.Tensor  # m: source column each mask-grid column reads, increasing (mirrored if flip)
    flip: bool  # mirror the image; grid columns come out mirrored: flip the rasterised masks back
    content_size: tuple[int, int]  # (h, w) the pixels are resized to, at the canvas's top-left
    original_size: tuple[int, int]  # (h, w) of the source image
    embedding: torch.Tensor | None = None  # C x h x w: the encoder's output for this canvas, from a cache


@dataclass(frozen=True)
class Placement:
    """Where the source image lands on the canvas: scale, crop offset, flip."""

    height: int
    width: int
    scale: float  # canvas pixels per source pixel
    offset: tuple[int, int]  # (oy, ox): canvas window's origin in the scaled image (crop when > 0)
    content: tuple[int, int]  # (h, w) of the canvas covered by the image
    flip: bool

    @classmethod
    def choose(cls, height: int, width: int, cfg: SampleConfig, rng: np.random.Generator) -> "Placement":
        """Resize longest side to the canvas; with jitter, rescale and randomly crop; maybe flip."""
        size = cfg.image_size
        jitter = rng.uniform(*cfg.jitter_scale) if cfg.jitter_scale else 1.0
        scale = size / max(height, width) * jitter
        if jitter == 1.0:
            scaled = longest_side_shape(height, width, size)  # Meta's rounding, as at inference
        else:
            scaled = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        oy = int(rng.integers(0, scaled[0] - size + 1)) if scaled[0] > size else 0
        ox = int(rng.integers(0, scaled[1] - size + 1)) if scaled[1] > size else 0
        content = (min(size, scaled[0] - oy), min(size, scaled[1] - ox))
        flip = bool(cfg.hflip_prob > 0 and rng.random() < cfg.hflip_prob)
        return cls(height, width, scale, (oy, ox), content, flip)

    def source_box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the source region shown on the canvas, in source pixels."""
        (oy, ox), (ch, cw) = self.offset, self.content
        x0, x1 = ox / self.scale, (ox + cw) / self.scale
        if self.flip:
            x0, x1 = self.width - x1, self.width - x0
        return x0, oy / self.scale, x1, (oy + ch) / self.scale

    def mask_grid(self, mask_size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """Source row and column read by each mask-grid pixel centre; with flip the columns are mirrored
        and listed in increasing order (rasterise, then flip back)."""
        centres = (np.arange(mask_size) + 0.5) * stride
        oy, ox = self.offset
        ys = np.where(centres < self.content[0], (centres + oy) / self.scale, -1.0)
        xs = np.where(centres < self.content[1], (centres + ox) / self.scale, -1.0)
        rows = rle.sample_grid(self.height, ys)
        cols = rle.sample_grid(self.width, xs)
        if self.flip:
            cols = np.where(cols >= 0, self.width - 1 - cols, -1)[::-1].copy()
        return rows, cols


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample randomness from (seed, epoch, key): independent of worker layout, so resumable."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def _record(raw: RawSample) -> dict:
    """The sample's SA-1B record, its annotations unchecked; raises `SampleError` if the sample is bad."""
    if raw.error:
        raise raw.fail(raw.error)
    for ext in ("jpg", "json"):
        if ext not in raw.members:
            raise raw.fail(f"no .{ext} member")
    try:
        return parse_record(raw.members["json"], check_annotations=False)
    except ValueError as exc:
        raise raw.fail(str(exc)) from None


def decode_sample(raw: RawSample, cfg: SampleConfig, rng: np.random.Generator) -> TrainSample | None:
    """Decode one raw sample; None when no mask survives filtering. Raises `SampleError` if it is bad."""
    record = _record(raw)
    height, width = record["image"]["height"], record["image"]["width"]
    placement = Placement.choose(height, width, cfg, rng)

    try:
        keep = _mask_filter(height, width, placement, cfg)
        annotations = [a for a in record["annotations"] if keep(a)]
        rles = [a["segmentation"] for a in annotations]
    except (KeyError, TypeError, IndexError) as exc:
        raise raw.fail(f"an annotation does not follow the SA-1B schema ({type(exc).__name__}: {exc})") from None
    if len(annotations) > cfg.max_masks:
        chosen = sorted(rng.choice(len(annotations), cfg.max_masks, replace=False))
        annotations, rles = [annotations[i] for i in chosen], [rles[i] for i in chosen]
    if not annotations:
        return None

    pixels = _decode_pixels(raw, placement)
    try:
        counts, offsets = rle.batch_counts(rles, height, width)
    except rle.RLEError as exc:
        raise raw.fail(f"annotation id {annotations[exc.index].get('id')}: {exc}") from None
    except (AttributeError, KeyError, TypeError) as exc:
        raise raw.fail(f"a segmentation is not an RLE with size and counts ({exc})") from None
    rows, cols = placement.mask_grid(cfg.mask_size, cfg.mask_stride)
    return TrainSample(
        key=raw.key,
        shard=raw.shard,
        pixels=pixels,
        mask_runs=torch.from_numpy(counts),
        mask_offsets=torch.from_numpy(offsets),
        grid_rows=torch.from_numpy(rows),
        grid_cols=torch.from_numpy(cols),
        flip=placement.flip,
        content_size=placement.content,
        original_size=(height, width),
    )


def decode_image(raw: RawSample, cfg: SampleConfig, flip: bool) -> TrainSample:
    """The sample's image alone (no masks), placed as training places it without jitter, mirrored if
    `flip`: after `collate` and `expand_batch`, exactly the encoder's input (what embedding caches hold)."""
    record = _record(raw)
    height, width = record["image"]["height"], record["image"]["width"]
    unjittered = dataclasses.replace(cfg, jitter_scale=None, hflip_prob=0.0)  # draws nothing from the generator
    placement = dataclasses.replace(Placement.choose(height, width, unjittered, np.random.default_rng(0)), flip=flip)
    rows, cols = placement.mask_grid(cfg.mask_size, cfg.mask_stride)
    return TrainSample(
        key=raw.key,
        shard=raw.shard,
        pixels=_decode_pixels(raw, placement),
        mask_runs=torch.zeros(0, dtype=torch.int64),
        mask_offsets=torch.zeros(1, dtype=torch.int64),
        grid_rows=torch.from_numpy(rows),
        grid_cols=torch.from_numpy(cols),
        flip=flip,
        content_size=placement.content,
        original_size=(height, width),
    )


def _mask_filter(height: int, width: int, placement: Placement, cfg: SampleConfig) -> Callable[[dict], bool]:
    """Predicate on an annotation's JSON fields only, so nothing is decoded for a dropped mask."""
    max_area = cfg.max_area_fraction * height * width
    min_area = cfg.min_mask_area / (cfg.image_size / max(height, width)) ** 2  # in source pixels
    x0, y0, x1, y1 = placement.source_box()

    def keep(ann: dict) -> bool:
        x, y, w, h = ann["bbox"]
        return (
            min_area <= ann["area"] < max_area
            and ann["predicted_iou"] >= cfg.min_predicted_iou
            and ann["stability_score"] >= cfg.min_stability_score
            and x < x1 and x + w > x0 and y < y1 and y + h > y0  # reaches the canvas window
        )

    return keep


def _decode_pixels(raw: RawSample, placement: Placement) -> torch.Tensor:
    """The JPEG's region shown on the canvas, as h x w x 3 uint8, DCT-scaled when >= 2x what is needed."""
    try:
        image = Image.open(io.BytesIO(raw.members["jpg"]))
    except (OSError, SyntaxError) as exc:
        raise raw.fail(f"corrupt JPEG ({exc})") from None
    if image.size != (placement.width, placement.height):
        raise raw.fail(f"JPEG is {image.size[0]}x{image.size[1]} but its JSON says {placement.width}x{placement.height}")
    try:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale; draft picks the smallest not below the scaled size.
        image.draft("RGB", (int(placement.width * placement.scale + 1), int(placement.height * placement.scale + 1)))
        image = image.convert("RGB") if image.mode != "RGB" else image
        with warnings.catch_warnings():  # a read-only view: collate copies it, nothing writes it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            pixels = torch.from_numpy(np.asarray(image))  # h x w x 3
    except (OSError, SyntaxError, ValueError) as exc:
        raise raw.fail(f"corrupt JPEG ({exc})") from None
    x0, y0, x1, y1 = placement.source_box()
    fx, fy = pixels.shape[1] / placement.width, pixels.shape[0] / placement.height
    top, left = int(y0 * fy), int(x0 * fx)
    return pixels[top : max(top + 1, round(y1 * fy)), left : max(left + 1, round(x1 * fx))]


def collate(samples: list[TrainSample]) -> dict:
    """Compact batch of B samples: decoded pixels padded to the largest, mask runs concatenated."""
    height = max(s.pixels.shape[0] for s in samples)
    width = max(s.pixels.shape[1] for s in samples)
    pixels = torch.zeros(len(samples), height, width, 3, dtype=torch.uint8)
    for i, s in enumerate(samples):
        pixels[i, : s.pixels.shape[0], : s.pixels.shape[1]] = s.pixels
    counts = torch.tensor([len(s.mask_offsets) - 1 for s in samples])
    run_base = torch.tensor([0] + [int(s.mask_offsets[-1]) for s in samples]).cumsum(0)[:-1]
    batch = {
        "pixels": pixels,  # B x h x w x 3 uint8
        "pixel_sizes": torch.tensor([s.pixels.shape[:2] for s in samples], dtype=torch.long),  # B x 2
        "mask_runs": torch.cat([s.mask_runs for s in samples]),
        "mask_offsets": torch.cat(
            [torch.zeros(1, dtype=torch.long)] + [s.mask_offsets[1:] + base for s, base in zip(samples, run_base)]
        ),  # M + 1
        "mask_image": torch.repeat_interleave(torch.arange(len(samples)), counts),  # M
        "grid_rows": torch.stack([s.grid_rows for s in samples]),  # B x m
        "grid_cols": torch.stack([s.grid_cols for s in samples]),  # B x m
        "flips": torch.tensor([s.flip for s in samples]),  # B
        "source_heights": torch.tensor([s.original_size[0] for s in samples]),  # B
        "content_sizes": torch.tensor([s.content_size for s in samples], dtype=torch.long),  # B x 2
        "original_sizes": torch.tensor([s.original_size for s in samples], dtype=torch.long),  # B x 2
        "keys": [s.key for s in samples],
    }
    if samples[0].embedding is not None:  # a cache gives every sample its embedding, or none
        batch["embeddings"] = torch.stack([s.embedding for s in samples])  # B x C x h x w
    return batch


def expand_batch(batch: dict, image_size: int) -> dict:
    """Turn a compact batch into the training batch, on whatever device it now is.

    Adds `images` (B x 3 x S x S uint8: each image resized onto its canvas, top-left, zero
    padding, mirrored if flipped), `masks` (M x m x m bool) and `image_index` (M), so the encoder
    runs once per image and the decoder once over all masks. Masks left empty on the grid
    (cropped away by jitter, or thinner than a grid cell) are dropped.
    """
    pixels, pixel_sizes = batch.pop("pixels"), batch.pop("pixel_sizes")
    runs, offsets, owner = batch.pop("mask_runs"), batch.pop("mask_offsets"), batch.pop("mask_image")
    rows, cols, flips, heights = (batch.pop(k) for k in ("grid_rows", "grid_cols", "flips", "source_heights"))
    device = pixels.device
    images = torch.zeros(len(pixels), 3, image_size, image_size, dtype=torch.uint8, device=device)
    masks, image_index = [], []
    for b in range(len(pixels)):
        (h, w), (ch, cw) = pixel_sizes[b].tolist(), batch["content_sizes"][b].tolist()
        region = pixels[b, :h, :w].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)  # 1 x 3 x h x w
        # Antialiased bilinear, as PIL's resize at inference; CUDA interpolates floats only.
        resized = F.interpolate(region if device.type == "cpu" else region.float(), size=(ch, cw),
                                mode="bilinear", antialias=True, align_corners=False)
        resized = resized.round().clamp(0, 255).to(torch.uint8)[0] if resized.is_floating_point() else resized[0]
        images[b, :, :ch, :cw] = resized.flip(-1) if bool(flips[b]) else resized

        picked = torch.nonzero(owner == b).flatten()
        if picked.numel() == 0:
            continue
        first, last = int(picked[0]), int(picked[-1]) + 1
        grid = rle.SampleGrid(int(heights[b]), rows[b], cols[b])
        decoded = grid.decode_batch(runs[int(offsets[first]) : int(offsets[last])], offsets[first : last + 1] - offsets[first])
        if bool(flips[b]):
            decoded = decoded.flip(-1)
        decoded = decoded[decoded.flatten(1).any(1)]
        masks.append(decoded)
        image_index.append(torch.full((len(decoded),), b, dtype=torch.long, device=device))
    m = rows.shape[1]
    batch["images"] = images
    batch["masks"] = torch.cat(masks) if masks else torch.zeros(0, m, m, dtype=torch.bool, device=device)
    batch["image_index"] = torch.cat(image_index) if image_index else torch.zeros(0, dtype=torch.long, device=device)
    return batch
