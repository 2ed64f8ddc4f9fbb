"""`sam-train data convert`: extracted SA-1B folders, COCO instances and instance-label PNGs -> our shards.

Each converter lists its items, sorts them by sample key and hands them to `write_dataset`, so
shards are atomic, the manifest comes last and a rerun after an interruption keeps the finished
shards and writes only the rest. A bad item never stops a conversion: it is left out and reported
in `ConvertReport.skipped` as (item, reason), the reason naming the file. A rerun does not re-read
the items of shards it keeps, so it reports only the problems found while listing the source and
in the shards it writes.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from numbers import Real
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam_train.data import rle, sa1b
from sam_train.data.shards import unsafe_member_reason, write_dataset

JPEG_SUFFIXES = (".jpg", ".jpeg")
IMAGE_SUFFIXES = (*JPEG_SUFFIXES, ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I")  # single-channel integer images
REENCODE_QUALITY = 95  # non-JPEG sources: high enough that re-encoding costs no visible detail
# What PIL raises on a corrupt or unsupported file (DecompressionBombError for absurd sizes).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
T = TypeVar("T")
Skipped = list[tuple[str, str]]


@dataclass
class ConvertReport:
    """What a conversion wrote (its manifest) and what it left out, as (item, reason)."""

    manifest: dict
    skipped: Skipped = field(default_factory=list)


@dataclass(frozen=True)
class _Item(Generic[T]):
    """One would-be sample: its key in the shards, its name in skip reports, what `build` reads."""

    key: str
    name: str
    source: T


def convert_sa1b_folder(src_dir: str | os.PathLike, out_dir: str | os.PathLike, samples_per_shard: int) -> ConvertReport:
    """Re-shard an extracted SA-1B folder (`sa_N.jpg` + `sa_N.json`, paired by stem, any depth).

    JPEG bytes are kept unchanged; each JSON is validated (schema, header size = image.width and
    height, every RLE sized like the image) and re-serialised compactly.
    """
    skipped: Skipped = []
    exclude = [out_dir]
    jpegs = _index_by_stem(src_dir, JPEG_SUFFIXES, skipped, exclude)
    records = _index_by_stem(src_dir, (".json",), skipped, exclude)
    pairs = _pair(jpegs, records, "JPEG", "JSON", skipped)
    items = [_Item(_safe_key(stem), stem, (jpeg, record)) for stem, jpeg, record in pairs]
    source = {"kind": "sa1b-folder", "path": str(src_dir)}
    return _write(out_dir, items, _sa1b_sample, samples_per_shard, source, "sa1b", skipped)


def convert_coco(
    annotations_json: str | os.PathLike | None,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    samples_per_shard: int,
) -> ConvertReport:
    """Convert COCO instances (polygons, uncompressed or compressed RLE) to SA-1B masks, one sample per image.

    Masks are decoded exactly as pycocotools' `annToMask` does; COCO's own bbox and area are
    recomputed from them. iscrowd regions are kept as masks: they are real labelled pixels, and a
    promptable model should segment a crowd when asked to. Images without annotations are kept
    (empty list). JPEGs are copied byte for byte, other formats re-encoded as JPEG.
    """
    coco = _load_coco(annotations_json)
    images_root = _existing_dir(images_dir, "COCO images folder")
    skipped: Skipped = []
    images: dict[int, dict] = {}
    for i, entry in enumerate(coco["images"]):
        problem = _coco_image_problem(entry)
        if problem is None and entry["id"] in images:
            problem = f"image id {entry['id']} repeats an earlier image entry"
        if problem is not None:
            skipped.append((_coco_image_name(entry, i), problem))
        else:
            images[entry["id"]] = entry
    by_image: dict[int, list[dict]] = defaultdict(list)
    for i, ann in enumerate(coco.get("annotations") or []):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            skipped.append((f"annotation #{i}", "has no integer id"))
        elif ann.get("image_id") not in images:
            skipped.append((f"ann {ann['id']}", f"refers to unknown image id {ann.get('image_id')!r}"))
        else:
            by_image[ann["image_id"]].append(ann)
    items = [
        _Item(_safe_key(str(PurePosixPath(e["file_name"]).with_suffix(""))), e["file_name"],
              (images_root / e["file_name"], e, by_image[image_id]))
        for image_id, e in images.items()
    ]
    source = {"kind": "coco", "annotations": str(annotations_json), "images": str(images_dir)}
    return _write(out_dir, items, partial(_coco_sample, skipped=skipped), samples_per_shard, source, "coco", skipped)


def convert_mask_folder(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    samples_per_shard: int,
) -> ConvertReport:
    """Convert images + instance-label PNGs (same stem; 0 = background, each other value one instance)."""
    masks_root = _existing_dir(masks_dir, "instance-label PNG folder (--masks)")
    skipped: Skipped = []
    images = _index_by_stem(images_dir, IMAGE_SUFFIXES, skipped, exclude=[out_dir, masks_root])
    labels = _index_by_stem(masks_root, (".png",), skipped, exclude=[out_dir])
    pairs = _pair(images, labels, "image", "label PNG", skipped)
    # No ids in the source: the position in stem order is stable across reruns.
    items = [_Item(_safe_key(stem), stem, (i, image, label)) for i, (stem, image, label) in enumerate(pairs)]
    source = {"kind": "instance-masks", "images": str(images_dir), "masks": str(masks_dir)}
    return _write(out_dir, items, _mask_folder_sample, samples_per_shard, source, "masks", skipped)


def coco_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """H x W bool mask of a COCO segmentation, decoded as pycocotools' annToMask; ValueError if unusable or empty."""
    if isinstance(segmentation, list):
        for j, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon) or len(polygon) % 2:
                raise ValueError(f"polygon {j} is not an even-length list of coordinates")
        # Under 3 points a polygon encloses nothing, and pycocotools would read 4 numbers as a box.
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            raise ValueError("empty mask")
        encoded = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        try:
            rle.validated_counts(segmentation, height, width)
        except ValueError as exc:
            raise ValueError(f"bad RLE: {exc}") from exc
        counts = segmentation["counts"]
        if isinstance(counts, list):
            encoded = mask_utils.frPyObjects(segmentation, height, width)
        else:
            encoded = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError("segmentation is neither polygons nor an RLE")
    mask = mask_utils.decode(encoded).astype(bool)
    if not mask.any():
        raise ValueError("empty mask")
    return mask


def _write(
    out_dir: str | os.PathLike,
    items: list[_Item[T]],
    build: Callable[[T], tuple[bytes, dict]],
    samples_per_shard: int,
    source: dict,
    prefix: str,
    skipped: Skipped,
) -> ConvertReport:
    """Shard `items` in key order (the first of a repeated key wins), collecting every skip."""
    unique: dict[str, _Item[T]] = {}
    for item in sorted(items, key=lambda it: (it.key, it.name)):
        if not item.key:
            skipped.append((item.name, "yields an empty sample key"))
        elif item.key in unique:
            skipped.append((item.name, f"sample key {item.key!r} is already taken by {unique[item.key].name}"))
        else:
            unique[item.key] = item

    def make_sample(item: _Item[T]) -> tuple[str, dict[str, bytes]]:
        jpeg, record = build(item.source)
        return item.key, {"jpg": jpeg, "json": json.dumps(record, separators=(",", ":")).encode()}

    def on_skip(item: _Item[T], error: Exception) -> None:
        skipped.append((item.name, str(error)))

    manifest = write_dataset(out_dir, list(unique.values()), make_sample, samples_per_shard, source, prefix, on_skip)
    return ConvertReport(manifest, skipped)


def _sa1b_sample(source: tuple[Path, Path]) -> tuple[bytes, dict]:
    """The original JPEG bytes and its validated record; ValueError naming the file when they disagree."""
    jpeg_path, json_path = source
    data, fmt, size = _read_image(jpeg_path)
    if fmt != "JPEG":
        raise ValueError(f"{jpeg_path}: is a {fmt} image, SA-1B images are JPEG")
    try:
        record = sa1b.parse_record(json_path.read_bytes())
    except OSError as exc:
        raise ValueError(f"{json_path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{json_path}: {exc}") from exc
    width, height = record["image"]["width"], record["image"]["height"]
    _check_size(jpeg_path, size, width, height, f"{json_path.name} (image.width x image.height)")
    for i, ann in enumerate(record["annotations"]):
        try:
            rle.validated_counts(ann["segmentation"], height, width)
        except ValueError as exc:
            raise ValueError(f"{json_path}: annotation {i} (id {ann.get('id')!r}): {exc}") from exc
    return data, record


def _coco_sample(source: tuple[Path, dict, list[dict]], skipped: Skipped) -> tuple[bytes, dict]:
    """JPEG bytes and SA-1B record of one COCO image; a bad annotation is skipped alone."""
    path, entry, annotations = source
    width, height = entry["width"], entry["height"]
    data, fmt, size = _read_image(path)
    _check_size(path, size, width, height, "the COCO JSON")
    jpeg = _as_jpeg(data, fmt, path)
    converted = []
    for ann in annotations:
        try:
            mask = coco_mask(ann.get("segmentation"), height, width)
        except ValueError as exc:
            skipped.append((f"{entry['file_name']} ann {ann['id']}", str(exc)))
            continue
        converted.append(sa1b.make_annotation(mask, ann_id=ann["id"]))
    return jpeg, sa1b.make_record(entry["id"], entry["file_name"], height, width, converted)


def _mask_folder_sample(source: tuple[int, Path, Path]) -> tuple[bytes, dict]:
    """JPEG bytes and SA-1B record of one image + instance-label PNG; ValueError naming the file if unusable."""
    image_id, image_path, label_path = source
    data, fmt, (width, height) = _read_image(image_path)
    label_data, label_fmt, label_size = _read_image(label_path)
    _check_size(label_path, label_size, width, height, f"its image {image_path.name}")
    try:
        with Image.open(io.BytesIO(label_data)) as label:
            mode = label.mode
            labels = np.asarray(label) if label_fmt == "PNG" and mode in LABEL_MODES else None  # H x W instance ids
    except _IMAGE_ERRORS as exc:
        raise ValueError(f"{label_path}: cannot decode ({exc})") from exc
    if labels is None:
        raise ValueError(f"{label_path}: a {label_fmt} of mode {mode}, need a single-channel PNG ({', '.join(LABEL_MODES)})")
    annotations = [sa1b.make_annotation(labels == value, ann_id=int(value)) for value in np.unique(labels) if value != 0]
    return _as_jpeg(data, fmt, image_path), sa1b.make_record(image_id, image_path.name, height, width, annotations)


def _read_image(path: Path) -> tuple[bytes, str, tuple[int, int]]:
    """File bytes, PIL format and (width, height) from the header alone; ValueError naming the file if unusable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = str(image.format), image.size
    except _IMAGE_ERRORS as exc:
        raise ValueError(f"{path}: corrupt or unsupported image ({exc})") from exc
    # The header parses even when a download or extraction was cut short; the last marker tells.
    if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise ValueError(f"{path}: JPEG lacks its end-of-image marker (truncated file)")
    return data, fmt, size


def _as_jpeg(data: bytes, fmt: str, path: Path) -> bytes:
    """JPEG bytes unchanged; any other format decoded and re-encoded as RGB JPEG."""
    if fmt == "JPEG":
        return data
    try:
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=REENCODE_QUALITY)
    except _IMAGE_ERRORS as exc:
        raise ValueError(f"{path}: cannot re-encode {fmt} as JPEG ({exc})") from exc
    return out.getvalue()


def _check_size(path: Path, size: tuple[int, int], width: int, height: int, other: str) -> None:
    """ValueError naming the file when its (width, height) is not what `other` says."""
    if tuple(size) != (width, height):
        raise ValueError(f"{path} is {size[0]}x{size[1]} (width x height) but {other} says {width}x{height}")


def _index_by_stem(
    root: str | os.PathLike, suffixes: tuple[str, ...], skipped: Skipped, exclude: Iterable[str | os.PathLike | None] = ()
) -> dict[str, Path]:
    """Files under `root` (any depth, suffix in any case) by stem; a repeated stem keeps the first path."""
    root = _existing_dir(root, "source folder")
    excluded = {Path(p).resolve() for p in exclude if p is not None}
    found: dict[str, Path] = {}
    for directory, subdirs, files in os.walk(root):
        # Never read our own output (an out_dir inside the source would list manifest.json).
        subdirs[:] = sorted(d for d in subdirs if (Path(directory) / d).resolve() not in excluded)
        for name in sorted(files):
            path = Path(directory) / name
            if path.suffix.lower() not in suffixes:
                continue
            if path.stem in found:
                skipped.append((str(path), f"same stem as {found[path.stem]}, which is converted instead"))
            else:
                found[path.stem] = path
    return found


def _pair(
    first: dict[str, Path], second: dict[str, Path], first_kind: str, second_kind: str, skipped: Skipped
) -> list[tuple[str, Path, Path]]:
    """(stem, first file, second file) for stems present in both, in stem order; an orphan is skipped."""
    pairs = []
    for stem in sorted(first.keys() | second.keys()):
        a, b = first.get(stem), second.get(stem)
        if a is None:
            skipped.append((stem, f"{b}: no {first_kind} with the same stem"))
        elif b is None:
            skipped.append((stem, f"{a}: no {second_kind} with the same stem"))
        else:
            pairs.append((stem, a, b))
    return pairs


def _safe_key(name: str) -> str:
    """A sample key for a source name: our tar reader cuts keys at the basename's first dot."""
    return re.sub(r"[./\\]", "_", name)


def _load_coco(path: str | os.PathLike | None) -> dict:
    """The COCO JSON; FileNotFoundError or ValueError (whole conversion) if it cannot be used at all."""
    if path is None:
        raise FileNotFoundError("no COCO instances JSON given (pass --annotations)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO instances JSON {path} does not exist")
    try:
        coco = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise ValueError(f"{path}: not a COCO instances file (no 'images' list)")
    if not isinstance(coco.get("annotations", []), list):
        raise ValueError(f"{path}: 'annotations' is not a list")
    return coco


def _coco_image_problem(entry: Any) -> str | None:
    """Why a COCO image entry cannot be converted, else None."""
    if not isinstance(entry, dict) or not _is_int(entry.get("id")):
        return "image entry has no integer id"
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not PurePosixPath(file_name).name:
        return "image entry has no file_name"
    if unsafe_member_reason(file_name) is not None:
        return f"file_name {file_name!r} points outside the images folder (absolute or '..')"
    if not all(_is_int(entry.get(k)) and entry[k] > 0 for k in ("width", "height")):
        return f"width and height must be positive integers, got {entry.get('width')!r} x {entry.get('height')!r}"
    return None


def _coco_image_name(entry: Any, index: int) -> str:
    """How skip reports name a COCO image entry: its file_name, else its position."""
    name = entry.get("file_name") if isinstance(entry, dict) else None
    return name if isinstance(name, str) and name else f"image #{index}"


def _existing_dir(path: str | os.PathLike | None, what: str) -> Path:
    """`path` as a Path; FileNotFoundError naming `what` if it is not a folder."""
    if path is None:
        raise FileNotFoundError(f"no {what} given")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a folder")
    return Path(path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
