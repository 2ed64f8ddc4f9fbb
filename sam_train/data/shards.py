"""Webdataset tar shards: write them crash-safely with a manifest, stream them back sample by sample.

A shard holds samples as adjacent members `<key>.jpg` + `<key>.json` (SA-1B's own tar layout),
so raw SA-1B tars and our shards are read by the same code. A shard file appears only once it is
complete (temp name, fsync, rename); `manifest.json` is written last, so a dataset folder with a
manifest is always whole. Several processes may write one dataset (`write_shards` by rank, each
shard by exactly one of them); `finish_dataset` then writes the manifest once every shard exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import webdataset as wds

from sam_train.atomic_io import atomic_path, atomic_write_bytes
from sam_train.data.errors import SampleError, ShardLayoutError
from sam_train.data.sa1b import SCHEMA_VERSION

MANIFEST = "manifest.json"
JOB_FILE = ".sam-train-job.json"  # what a folder is being filled with, for safe resumes
RESHARD_HINT = "re-shard it with `sam-train data convert` (it writes each sample's members adjacently)"
T = TypeVar("T")


@dataclass
class RawSample:
    """The undecoded members of one sample; `error` says why it cannot be used, if it cannot."""

    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension ("jpg", "json") -> bytes
    error: str | None = None

    def fail(self, reason: str) -> SampleError:
        return SampleError(self.shard, self.key, reason)


def shard_name(index: int, prefix: str = "shard") -> str:
    return f"{prefix}-{index:06d}.tar"


def write_shard(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]], note: dict | None = None) -> dict:
    """Write (key, members) samples into one tar, atomically; return its manifest entry.

    With `note`, the entry plus `note` goes to the shard's sidecar (`sidecar_path`) before the
    shard itself appears, so that no shard lacks its sidecar, wherever its writer is killed.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="", group="", mode=0o644) as tar:
            for key, members in samples:
                tar.write({"__key__": key, **members})
        entry = {**shard_entry(tmp, len(samples)), "name": path.name}
        if note is not None:
            entry.update(note)
            atomic_write_bytes(sidecar_path(path), json.dumps(entry).encode())
    return entry


def shard_entry(path: Path, samples: int) -> dict:
    """Manifest entry of a finished shard file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": path.name, "samples": samples, "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def sidecar_path(shard: Path) -> Path:
    """`shard-000003.tar` -> `shard-000003.json`: the shard's manifest entry, kept beside it."""
    return shard.with_suffix(".json")


class MissingShardsError(FileNotFoundError):
    """A dataset cannot be finished yet: some of its shards have not been written."""


def write_dataset(
    out_dir: str | os.PathLike,
    items: Sequence[T],
    make_sample: Callable[[T], tuple[str, dict[str, bytes]] | None],
    samples_per_shard: int,
    source: dict[str, Any],
    prefix: str = "shard",
    on_skip: Callable[[T, Exception], None] | None = None,
    map_fn: Callable[..., Iterable] = map,
) -> dict:
    """Turn `items` into shards of `samples_per_shard` items each, then write the manifest (in one process)."""
    written = write_shards(out_dir, items, make_sample, samples_per_shard, source, prefix, on_skip, map_fn)
    return finish_dataset(out_dir, len(items), samples_per_shard, source, prefix, written)


def write_shards(
    out_dir: str | os.PathLike,
    items: Sequence[T],
    make_sample: Callable[[T], tuple[str, dict[str, bytes]] | None],
    samples_per_shard: int,
    source: dict[str, Any],
    prefix: str = "shard",
    on_skip: Callable[[T, Exception], None] | None = None,
    map_fn: Callable[..., Iterable] = map,
    item_name: Callable[[T], str] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, dict]:
    """Write the shards of `rank` (shard i is rank i % world_size's) that do not exist yet; return
    their manifest entries by shard name.

    Item i always lands in shard i // samples_per_shard, so a rerun after an interruption keeps
    every shard that was finished (they are complete by construction) and writes only the rest:
    no duplicates, no gaps, with any number of ranks, which may change between reruns. Ranks
    take every world_size-th shard rather than a block each, so that their shares of work stay
    even however the items are ordered (neighbours in a sorted list tend to be alike).
    `make_sample` returns (key, members) or None to leave an item out; a ValueError it raises
    is passed to `on_skip` (default: re-raised). `map_fn` (e.g. a process pool's `map`, with a
    picklable `make_sample`) produces one shard's samples in parallel. With `item_name`, each
    shard gets a sidecar holding its manifest entry and its skipped items as [name, reason]:
    `finish_dataset`, in another process and after any kill, then neither re-reads the shards
    nor loses a skip.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of world size {world_size}'s (0..{world_size - 1})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, _job(source, samples_per_shard, prefix, len(items)))
    written = {}
    for index in range(rank, _shard_count(len(items), samples_per_shard), world_size):
        path = out / shard_name(index, prefix)
        if path.exists():
            continue
        chunk = items[index * samples_per_shard : (index + 1) * samples_per_shard]
        samples, skipped = [], []
        for item, (sample, error) in zip(chunk, map_fn(partial(_attempt, make_sample), chunk)):
            if error is not None:
                if on_skip is None:
                    raise error
                on_skip(item, error)
                if item_name is not None:
                    skipped.append([item_name(item), str(error)])
            elif sample is not None:
                samples.append(sample)
        written[path.name] = write_shard(path, samples, None if item_name is None else {"skipped": skipped})
    return written


def finish_dataset(
    out_dir: str | os.PathLike,
    items: int,
    samples_per_shard: int,
    source: dict[str, Any],
    prefix: str = "shard",
    known: Mapping[str, dict] | None = None,
    dataset_format: str = "sa1b-webdataset",
) -> dict:
    """Write the manifest of a job's `items` items once every one of its shards exists; return it.

    Raises MissingShardsError naming the shards not written yet. Shards are listed in index
    order; an entry comes from `known` (what `write_shards` returned), else the shard's sidecar,
    else by reading the shard. Leftovers of writers killed mid-shard are removed: no shard is
    missing, so nothing is being written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, _job(source, samples_per_shard, prefix, items))
    paths = [out / shard_name(i, prefix) for i in range(_shard_count(items, samples_per_shard))]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise MissingShardsError(
            f"{out}: {len(missing)} of {len(paths)} shards are not written yet ({shown}); rerun the command(s)"
            " that write them (the same command resumes), then finish the dataset again"
        )
    entries = [(known or {}).get(p.name) or _finished_entry(p) for p in paths]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "format": dataset_format,  # what the samples hold: SA-1B images and masks, or e.g. embeddings
        "source": source,
        "samples_per_shard": samples_per_shard,
        "total_samples": sum(e["samples"] for e in entries),
        "shards": entries,
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    for leftover in out.glob(f".{prefix}-*.tmp"):  # atomic_path's temporaries of a killed writer
        leftover.unlink(missing_ok=True)
    return manifest


def write_share(
    out_dir: str | os.PathLike,
    items: Sequence[T],
    make_sample: Callable[[T], tuple[str, dict[str, bytes]] | None],
    samples_per_shard: int,
    source: dict[str, Any],
    prefix: str,
    on_skip: Callable[[T, Exception], None],
    item_name: Callable[[T], str],
    rank: int,
    world_size: int,
    dataset_format: str = "sa1b-webdataset",
) -> dict | None:
    """One process's part of a job that several may share: its shards (with sidecars), and the manifest
    too when it is the only process; None otherwise (`finish_dataset`, once every rank is done)."""
    written = write_shards(out_dir, items, make_sample, samples_per_shard, source, prefix, on_skip,
                           item_name=item_name, rank=rank, world_size=world_size)
    if world_size > 1:
        return None
    return finish_dataset(out_dir, len(items), samples_per_shard, source, prefix, known=written,
                          dataset_format=dataset_format)


def skipped_items(manifest: dict) -> list[list[str]]:
    """Every item any rank left out, as [name, reason], from the shard entries (their sidecars)."""
    return [item for entry in manifest["shards"] for item in entry.get("skipped", [])]


def _finished_entry(shard: Path) -> dict:
    """A shard's manifest entry: from its sidecar when it has one, else by reading the shard."""
    sidecar = sidecar_path(shard)
    return json.loads(sidecar.read_text()) if sidecar.exists() else shard_entry(shard, count_samples(shard))


def _shard_count(items: int, samples_per_shard: int) -> int:
    return -(-items // samples_per_shard)


def _job(source: dict[str, Any], samples_per_shard: int, prefix: str, items: int) -> dict:
    """What a folder is filled with: the same for every rank of a job and for its finishing step."""
    return {"source": source, "samples_per_shard": samples_per_shard, "prefix": prefix, "items": items}


def _claim(out: Path, job: dict) -> None:
    """Record what this folder is being filled with; refuse to resume a different job into it.

    Resuming keeps finished shards, which is only right when they came from the same source
    with the same shard size. Ranks start together: the first claim is created whole and never
    replaced (`_create_once`), so a rank of another job cannot slip in beside them.
    """
    path = out / JOB_FILE
    _create_once(path, json.dumps(job, indent=1).encode())
    previous = json.loads(path.read_text())
    if previous != json.loads(json.dumps(job)):
        raise ValueError(f"{out} already holds shards of another conversion ({previous}); write into an empty folder")


def _create_once(path: Path, data: bytes) -> None:
    """Create `path` holding `data` unless it exists; readers never see it partly written.

    The file is written under a temporary name and hard-linked into place: unlike a rename, a
    link fails when the target exists, so of several concurrent writers exactly one wins.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _attempt(make_sample: Callable, item: Any) -> tuple[Any, ValueError | None]:
    try:
        return make_sample(item), None
    except ValueError as exc:
        return None, exc


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    """The manifest of a dataset folder written by `write_dataset`."""
    path = Path(dataset_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a finished sam-train dataset (convert or synth it first)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc})") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {manifest.get('schema_version')!r}, this sam-train reads {SCHEMA_VERSION}")
    return manifest


@dataclass(frozen=True)
class ShardRef:
    """A shard to read and how many samples it holds."""

    url: str
    samples: int


def resolve_shards(sources: Sequence[str | os.PathLike]) -> list[ShardRef]:
    """Expand dataset folders (via their manifest), folders of tars (raw SA-1B) and tar paths."""
    refs: list[ShardRef] = []
    for source in sources:
        path = Path(source)
        if path.is_dir() and (path / MANIFEST).is_file():
            refs += [ShardRef(str(path / e["name"]), int(e["samples"])) for e in read_manifest(path)["shards"]]
        elif path.is_dir():
            tars = sorted(path.glob("*.tar"))
            if not tars:
                raise FileNotFoundError(f"{path}: no manifest.json and no .tar files")
            refs += [ShardRef(str(t), count_samples(t)) for t in tars]
        elif path.is_file():
            refs.append(ShardRef(str(path), count_samples(path)))
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return refs


def count_samples(path: str | os.PathLike) -> int:
    """Number of distinct keys in a local tar, reading only member headers (fast on 10 GB tars)."""
    return len(shard_keys(path))


def shard_keys(path: str | os.PathLike) -> list[str]:
    """The distinct sample keys of a local tar in the order they first appear, from member headers alone."""
    keys: dict[str, None] = {}
    with tarfile.open(path, mode="r:*") as tar:  # plain tars seek past data; compressed ones are read
        for info in tar:
            if info.isreg():
                keys.setdefault(split_member_name(info.name)[0])
            tar.members = []  # keep memory flat on huge tars
    return list(keys)


def split_member_name(name: str) -> tuple[str, str]:
    """'./sa_1.jpg' -> ('sa_1', 'jpg'): the key is everything before the first dot of the basename."""
    name = name[2:] if name.startswith("./") else name
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def unsafe_member_reason(name: str) -> str | None:
    """Why a member path must never be used (absolute, or climbing out with '..'), else None."""
    if name.startswith("/") or name.startswith("\\"):
        return f"member path {name!r} is absolute"
    if ".." in name.replace("\\", "/").split("/"):
        return f"member path {name!r} climbs out of the archive with '..'"
    return None


def iter_raw_samples(url: str, skip: int = 0, limit: int | None = None) -> Iterator[RawSample]:
    """Stream samples of one tar (local path or any webdataset URL, e.g. `pipe:...`), no extraction.

    Members of a sample must be adjacent; a key that comes back later raises ShardLayoutError
    with the fix. A member with an unsafe path or a duplicated extension makes its sample carry
    an `error` (the caller counts it as bad) instead of stopping the stream. The first `skip`
    samples are passed over without reading their data into Python; at most `limit` are yielded.
    """
    finished: set[str] = set()
    current: RawSample | None = None
    index = 0  # samples started so far
    emitted = 0
    with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, ext = split_member_name(info.name)
            if current is None or key != current.key:
                if current is not None:
                    finished.add(current.key)
                    if current.members or current.error:
                        yield current
                        emitted += 1
                if key in finished:
                    raise ShardLayoutError(f"{url}: members of sample {key!r} are not adjacent; {RESHARD_HINT}")
                if limit is not None and emitted >= limit:
                    return
                current = RawSample(url, key)
                index += 1
            tar.members = []
            if index <= skip:
                continue
            reason = unsafe_member_reason(info.name)
            if reason is None and ext in current.members:
                reason = f"duplicate member {info.name!r}"
            if reason is not None:
                current.error = current.error or reason
                continue
            current.members[ext] = tar.extractfile(info).read()
        if current is not None and (current.members or current.error) and (limit is None or emitted < limit):
            yield current


def read_sample(url: str, key: str) -> RawSample:
    """The one sample with `key` from a shard (for `data show` and debugging)."""
    for sample in iter_raw_samples(url):
        if sample.key == key:
            return sample
    raise KeyError(f"{url}: no sample with key {key!r}")
