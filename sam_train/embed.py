"""`sam-train embed`: a frozen image encoder's output for every sample of some shards, written once
as an embedding cache (`sam_train.data.embeddings`) for decoder-only training, and the check that
a cache meets only the model and preprocessing it was made with.

Each embedding is of the exact encoder input training builds (`decode_image` -> `collate` ->
`expand_batch` -> `Sam.normalize_canvas`), so reading it instead of running the encoder changes
nothing but the storage rounding (bf16: ~3 significant digits).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from timm.layers import DropPath

from sam_train.data.embeddings import CACHE_FORMAT, DTYPES, HFLIP, MEMBER, PLAIN, EmbeddingCache, pack_embeddings
from sam_train.data.errors import SampleError
from sam_train.data.pipeline import CANVAS_VERSION, SampleConfig, collate, decode_image, expand_batch
from sam_train.data.shards import (
    RawSample, finish_dataset, iter_raw_samples, resolve_shards, shard_keys, skipped_items, write_share,
)
from sam_train.model import Sam
from sam_train.model.checkpoint import weights_digest

Item = tuple[str, int, str]  # (shard, index of the sample in it, sample key)


def encoder_fingerprint(model: Sam) -> dict:
    """What an embedding depends on besides the image: encoder weights, input size, pixel statistics, canvas."""
    return {
        "encoder_sha256": weights_digest(model.image_encoder),
        "image_size": model.image_size,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "canvas_version": CANVAS_VERSION,
    }


def check_cache_fits(model: Sam, cache: EmbeddingCache) -> None:
    """Refuse a cache made by another encoder or preprocessing, and training whose encoder output would
    differ from the cached one (a trainable encoder or LoRA, stochastic depth)."""
    trainable = [name for name, p in model.image_encoder.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"the image encoder trains ({len(trainable)} tensors, e.g. {trainable[0]}), so cached embeddings go stale:"
            " decoder-only training from data.embedding_cache needs model.finetune.freeze_image_encoder=true and"
            " model.finetune.lora_rank=0 (or set data.embedding_cache=null to run the encoder)"
        )
    if any(m.drop_prob > 0 for m in model.image_encoder.modules() if isinstance(m, DropPath)):
        raise ValueError("model.drop_path > 0 drops encoder blocks at random in training; the cache holds the"
                         " whole encoder's output: set model.drop_path=0 to train from data.embedding_cache")
    expected = encoder_fingerprint(model)
    differs = {k: (cache.source.get(k), v) for k, v in expected.items() if cache.source.get(k) != v}
    if differs:
        shown = "; ".join(f"{k}: cache {cached!r}, model {wanted!r}" for k, (cached, wanted) in differs.items())
        raise ValueError(
            f"the embedding cache {cache.folder} was made by another image encoder or preprocessing ({shown}):"
            " rebuild it with `sam-train embed` from this model's checkpoint, or set data.embedding_cache=null"
        )


@dataclass(frozen=True)
class EmbedJob:
    """What an embedding job is: worked out alike by every rank and by the step that finishes it."""

    items: list[Item]  # every sample of the sources, in shard order
    source: dict  # the manifest's "source": what the embeddings depend on, and what a resume must match
    variants: list[str]
    dtype: str
    samples_per_shard: int


def embed_job(model: Sam, sources: Sequence[str | os.PathLike], cfg: DictConfig) -> EmbedJob:
    """The job of embedding every sample of `sources` (dataset folders, folders of tars, tars); keys must be unique."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    items: list[Item] = []
    owner: dict[str, str] = {}
    for ref in resolve_shards(sources):
        for index, key in enumerate(shard_keys(ref.url)):
            if key in owner:  # the cache is keyed by sample key: two images under one key would share an embedding
                raise ValueError(f"sample key {key!r} is in both {owner[key]} and {ref.url}: a cache needs unique keys")
            owner[key] = ref.url
            items.append((ref.url, index, key))
    variants = [PLAIN, HFLIP] if cfg.hflip else [PLAIN]
    source = {
        "kind": "embeddings",
        **encoder_fingerprint(model),
        "variants": variants,
        "dtype": cfg.dtype,
        "keys_sha256": hashlib.sha256("\n".join(key for _, _, key in items).encode()).hexdigest(),
    }
    return EmbedJob(items, source, variants, cfg.dtype, int(cfg.samples_per_shard))


def embed_canvases(model: Sam, raw: RawSample, variants: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each variant's C x h x w embedding of one sample, from exactly the input training would give the encoder."""
    cfg = SampleConfig(image_size=model.image_size)
    batch = collate([decode_image(raw, cfg, flip=variant == HFLIP) for variant in variants])
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch = expand_batch(batch, cfg.image_size)
    with torch.no_grad():
        embeddings = model.encode_image(model.normalize_canvas(batch["images"], batch["content_sizes"]))
    return dict(zip(variants, embeddings))


class _ForwardReader:
    """Raw samples by (shard, index), reading forward through one open shard (a rank's items come in order)."""

    def __init__(self) -> None:
        self._shard, self._next, self._samples = None, 0, iter(())

    def read(self, shard: str, index: int, key: str) -> RawSample:
        if shard != self._shard or index != self._next:
            self._shard, self._next, self._samples = shard, index, iter_raw_samples(shard, skip=index)
        raw = next(self._samples, None)
        self._next += 1
        if raw is None or raw.key != key:
            raise SampleError(shard, key, f"sample {index} of the shard is not {key!r} any more: the shard changed")
        return raw


def embed_shards(
    model: Sam,
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: DictConfig,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Write the embedding cache of `sources` under `out_dir`; returns the manifest plus "run" (what this call did).

    Resumable like every shard writer: a rerun with the same model and sources keeps finished shards;
    another model's job refuses to write into the folder. With `world_size` > 1 this process writes
    only rank `rank`'s shards and no manifest (and returns only "run"): `finish_embed` writes it.
    Samples that cannot be decoded are left out and listed, as training skips them too.
    """
    job = embed_job(model, sources, cfg)
    model.eval()
    reader = _ForwardReader()
    run: dict = {"embedded": 0, "skipped": []}

    def make_sample(item: Item) -> tuple[str, dict[str, bytes]]:
        raw = reader.read(*item)
        member = pack_embeddings(embed_canvases(model, raw, job.variants), job.dtype)
        run["embedded"] += 1
        return raw.key, {MEMBER: member}

    def on_skip(item: Item, error: Exception) -> None:
        run["skipped"].append([_item_name(item), str(error)])

    manifest = write_share(out_dir, job.items, make_sample, job.samples_per_shard, job.source, "embeddings", on_skip,
                           _item_name, rank, world_size, dataset_format=CACHE_FORMAT)
    return {**(manifest or {}), "run": run}


def finish_embed(model: Sam, sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, cfg: DictConfig) -> dict:
    """Write the manifest of a cache embedded by several ranks once every shard exists (MissingShardsError
    names those that do not); returns it plus "skipped": every sample left out, as [sample, reason]."""
    job = embed_job(model, sources, cfg)
    manifest = finish_dataset(out_dir, len(job.items), job.samples_per_shard, job.source, prefix="embeddings",
                              dataset_format=CACHE_FORMAT)
    return {**manifest, "skipped": skipped_items(manifest)}


def _item_name(item: Item) -> str:
    shard, _, key = item
    return f"{shard} {key}"
