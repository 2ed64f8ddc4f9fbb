"""`sam-train data check` / `data show`: find every bad sample before a long run trips over it.

The check streams each tar (never extracting or writing anything), verifies dataset shards
against their manifest (sha256, size, sample count) and prints one line per problem:
`<shard> <key>: <reason>` for a bad sample, `<shard> -: <reason>` for a shard-wide one, so the
output can be grepped and its line count matches the summary.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sam_train.atomic_io import atomic_path
from sam_train.data import rle
from sam_train.data.errors import ShardLayoutError
from sam_train.data.sa1b import check_annotation, parse_record
from sam_train.data.shards import (
    MANIFEST, RawSample, iter_raw_samples, read_manifest, read_sample, resolve_shards, shard_entry,
)
from sam_train.visualize import overlay_masks

MEMBERS = ("jpg", "json")
MAX_ANNOTATION_REASONS = 3  # one line per sample stays readable when all ~100 masks are bad


@dataclass
class CheckSummary:
    """What `check_shards` saw; `bad` counts printed problem lines (samples plus shard-wide ones)."""

    shards: int
    samples: int
    bad: int


def check_shards(sources: Sequence[str | os.PathLike], out: Callable[[str], None] = print) -> CheckSummary:
    """Validate every sample of dataset folders, folders of tars or tar files; print one line per problem."""
    summary = CheckSummary(shards=0, samples=0, bad=0)
    shard_urls: list[str] = []
    first_shard_of: dict[str, int] = {}  # key -> index of the shard it was first seen in

    def report(shard: str, key: str, reason: str) -> None:
        summary.bad += 1
        out(f"{shard} {key}: {reason}")

    for source in sources:
        try:
            shards = list(_expand(source))
        except ValueError as exc:  # a dataset folder whose manifest is unreadable
            report(str(source), "-", str(exc))
            continue
        for url, entry, error in shards:
            index = len(shard_urls)
            shard_urls.append(url)
            if error is not None:
                report(url, "-", error)
                continue
            for key, reasons in _check_shard(url, entry):
                if key is not None:
                    summary.samples += 1
                    first = first_shard_of.setdefault(key, index)
                    if first != index:  # also when the same shard is given twice: it would be read twice
                        reasons.append(f"duplicate key (also in {shard_urls[first]})")
                if reasons:
                    report(url, key or "-", "; ".join(reasons))
    summary.shards = len(shard_urls)
    out(f"checked {summary.samples} samples in {summary.shards} shards: {summary.bad} bad")
    return summary


def _expand(source: str | os.PathLike) -> Iterator[tuple[str, dict | None, str | None]]:
    """(shard, its manifest entry if any, why it cannot be opened if so) for each shard of `source`."""
    path = Path(source)
    try:
        refs = resolve_shards([path])
    except tarfile.TarError as exc:  # a corrupt raw tar: report it and still check its siblings
        if not path.is_dir():
            yield str(path), None, f"unreadable tar ({exc})"
            return
        for tar in sorted(path.glob("*.tar")):
            yield from _expand(tar)
        return
    entries: dict[str, dict] = {}
    if path.is_dir() and (path / MANIFEST).is_file():
        entries = {str(path / e["name"]): e for e in read_manifest(path)["shards"]}
    for ref in refs:
        yield ref.url, entries.get(ref.url), None


def _check_shard(url: str, entry: dict | None) -> Iterator[tuple[str | None, list[str]]]:
    """(key, reasons) for every sample of one shard (no reasons: good), and (None, [reason]) per shard-wide problem."""
    if entry is not None:
        if not Path(url).is_file():
            yield None, ["listed in manifest.json but missing"]
            return
        actual = shard_entry(Path(url), int(entry.get("samples", 0)))
        for field in ("sha256", "bytes"):
            if field in entry and entry[field] != actual[field]:
                yield None, [f"{field} {actual[field]} but manifest.json says {entry[field]} (changed after writing?)"]
    # Samples are held until the shard ends: interleaved members (a layout error found later)
    # make a sample look incomplete when only the layout is wrong.
    found: list[tuple[str, list[str], str | None]] = []  # (key, reasons, missing members)
    shard_error, interleaved = None, False
    try:
        for sample in iter_raw_samples(url):
            found.append((sample.key, inspect_sample(sample)[0], missing_members(sample)))
    except ShardLayoutError as exc:
        shard_error, interleaved = str(exc).removeprefix(f"{url}: "), True
    except (tarfile.TarError, OSError, EOFError) as exc:
        shard_error = f"unreadable tar after {len(found)} samples ({exc})"
    for key, reasons, missing in found:
        if missing and not interleaved:
            reasons.insert(0, missing)
        yield key, reasons
    if shard_error is not None:
        yield None, [shard_error]
    elif entry is not None and "samples" in entry and entry["samples"] != len(found):
        yield None, [f"holds {len(found)} samples but manifest.json says {entry['samples']}"]


def missing_members(sample: RawSample) -> str | None:
    """'missing json member' if so; None when complete or when its members were rejected (`error` says why)."""
    missing = [ext for ext in MEMBERS if ext not in sample.members]
    return f"missing {' and '.join(missing)} member" if missing and sample.error is None else None


def inspect_sample(sample: RawSample) -> tuple[list[str], Image.Image | None, dict | None]:
    """(why `sample` is unusable, its decoded RGB image, its parsed record); reasons empty when good.

    Missing members are left to the caller, which knows whether the shard's layout explains them.
    """
    if sample.error is not None:  # members were dropped, so nothing else can be trusted
        return [sample.error], None, None
    reasons: list[str] = []
    image = record = None
    if "jpg" in sample.members:
        try:
            image = Image.open(io.BytesIO(sample.members["jpg"])).convert("RGB")  # convert() decodes every pixel
        except UnidentifiedImageError:
            reasons.append("corrupt JPEG: not a decodable image")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            reasons.append(f"corrupt JPEG: {exc}")
    if "json" in sample.members:
        try:
            record = parse_record(sample.members["json"])
        except ValueError as exc:
            reasons.append(str(exc))
    if record is not None:
        height, width = record["image"]["height"], record["image"]["width"]
        if image is not None and (image.height, image.width) != (height, width):
            reasons.append(f"JSON image is {height}x{width} but the JPEG decodes to {image.height}x{image.width} (HxW)")
        failures = []
        for i, ann in enumerate(record["annotations"]):
            try:
                check_annotation(ann, height, width)
            except ValueError as exc:
                failures.append(f"annotation {i} (id {ann.get('id')}): {exc}")
        if failures:
            shown = "; ".join(failures[:MAX_ANNOTATION_REASONS])
            total = len(record["annotations"])
            reasons.append(shown if len(failures) == 1 else f"{shown} ({len(failures)} of {total} annotations bad)")
    return reasons, image, record


def show_sample(shard: str | os.PathLike, key: str, out: str | os.PathLike) -> Path:
    """Draw one sample's masks, points and boxes over its image into a PNG, to eyeball a dataset."""
    sample = read_sample(str(shard), key)
    reasons, image, record = inspect_sample(sample)
    missing = missing_members(sample)
    if missing:
        reasons.insert(0, missing)
    if reasons or image is None or record is None:
        raise sample.fail("; ".join(reasons) + " (`sam-train data check` lists every bad sample)")
    height, width = image.height, image.width
    grid = rle.SampleGrid.resize(height, width, height, width)  # identity grid, shared by all masks
    annotations = sorted(record["annotations"], key=lambda a: -a["area"])  # large first: small stay visible
    masks = grid.decode_batch(*rle.batch_counts([a["segmentation"] for a in annotations], height, width)).numpy()
    points = np.asarray([p for a in annotations for p in a["point_coords"]], dtype=np.float64).reshape(-1, 2)
    boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)], dtype=np.float64)
    drawn = overlay_masks(np.asarray(image), masks, points, np.ones(len(points)), boxes.reshape(-1, 4))
    path = Path(out)
    with atomic_path(path) as tmp:
        Image.fromarray(drawn).save(tmp, format="PNG")
    return path
