"""LightningDataModule over SA-1B-style shards: where batches come from, and where a run stands in the data."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from sam_train.data.embeddings import EmbeddingCache
from sam_train.data.iteration import ShardStream
from sam_train.data.pipeline import SampleConfig, TrainSample, collate, decode_sample, expand_batch, sample_rng
from sam_train.data.shards import RawSample, resolve_shards
from sam_train.data.synth import synth_dataset

log = logging.getLogger(__name__)

# Lightning warns whenever an IterableDataset has a length, since naive ones repeat data in every
# worker. ShardStream gives each rank and worker its own spans and its length is computed for the
# loader's worker count (batches_per_epoch), so the warning is wrong here and only hides real ones.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


def decode_for_stream(
    cfg: SampleConfig, seed: int, raw: RawSample, epoch: int, cache: EmbeddingCache | None = None
) -> TrainSample | None:
    """Picklable decode callable for DataLoader workers; with a cache, the sample brings its canvas's embedding."""
    sample = decode_sample(raw, cfg, sample_rng(seed, epoch, raw.key))
    if sample is not None and cache is not None:
        sample.embedding = cache.load(raw.key, sample.flip)  # the variant the sample's own flip chose
    return sample


def collate_stream(items: list[tuple[TrainSample, list[dict]]]) -> dict:
    """Collate (sample, skipped) pairs; the skipped records ride along to the main process."""
    batch = collate([sample for sample, _ in items])
    batch["skipped"] = [record for _, records in items for record in records]
    return batch


class _PositionedLoader(DataLoader):
    """A DataLoader that asks where to start each time an epoch's iteration begins."""

    def __init__(self, dataset: ShardStream, next_position: Callable[[int], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._next_position = next_position

    def __iter__(self):
        self.dataset.set_position(*self._next_position(len(self)))
        return super().__iter__()

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch(self.num_workers)


class SA1BDataModule(L.LightningDataModule):
    """Train/val batches from shards; its state (epoch, batches consumed) makes resume exact."""

    def __init__(
        self,
        train: Sequence[str],
        image_size: int,
        val: Sequence[str] = (),
        sample: dict | None = None,
        batch_size: int = 4,
        num_workers: int = 2,
        seed: int = 0,
        interleave: int = 4,
        resample_to: int | None = None,
        strict: bool = False,
        bad_samples_log: str | None = None,
        pin_memory: bool = True,
        synthesize: dict | None = None,
        embedding_cache: str | None = None,
        val_max_masks: int | None = None,
    ) -> None:
        super().__init__()
        self.train_sources, self.val_sources = list(train), list(val)
        self.sample_cfg = SampleConfig(image_size=image_size, **_as_tuples(dict(sample or {})))
        # Validation sees images as inference does: no jitter, no flip. Its own mask count keeps the
        # held-out masks fixed when a recipe samples more or fewer masks per training image.
        self.val_cfg = dataclasses.replace(
            self.sample_cfg, jitter_scale=None, hflip_prob=0.0, max_masks=val_max_masks or self.sample_cfg.max_masks
        )
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.interleave, self.resample_to, self.strict = interleave, resample_to, strict
        self.bad_samples_log = Path(bad_samples_log) if bad_samples_log else None
        self.pin_memory = pin_memory
        self.synthesize = dict(synthesize) if synthesize else None
        # Batches bring `embeddings` read from this `sam-train embed` folder; the module then skips the encoder.
        self.embedding_cache = EmbeddingCache(embedding_cache) if embedding_cache else None
        if self.embedding_cache is not None:
            self.embedding_cache.check_augmentation(self.sample_cfg)
        self.bad_samples = 0
        self._epoch = 0
        self._consumed = 0  # training batches of `_epoch` handed to the model

    def prepare_data(self) -> None:
        """With `synthesize`, write the built-in synthetic shards where train/val point (once; reruns keep them)."""
        if not self.synthesize:
            return
        cfg = self.synthesize
        for split, sources, offset in (("train", self.train_sources, 0), ("val", self.val_sources, 1)):
            for path in sources:
                synth_dataset(path, images=cfg[f"{split}_images"], seed=cfg["seed"] + offset,
                              samples_per_shard=cfg["samples_per_shard"])

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _stream(self, sources: list[str], cfg: SampleConfig, resample_to: int | None, num_workers: int) -> ShardStream:
        rank, world = self._rank_world()
        stream = ShardStream(
            resolve_shards(sources),
            decode=partial(decode_for_stream, cfg, self.seed, cache=self.embedding_cache),
            batch_size=self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            interleave_width=self.interleave,
            resample_to=resample_to,
            strict=self.strict,
        )
        stream.check_layout(num_workers)
        return stream

    def _loader(self, stream: ShardStream, next_position: Callable[[int], tuple[int, int]], num_workers: int) -> DataLoader:
        return _PositionedLoader(
            stream,
            next_position,
            batch_size=self.batch_size,
            num_workers=num_workers,
            collate_fn=collate_stream,
            pin_memory=self.pin_memory,
            persistent_workers=False,  # workers are re-forked each epoch with the new position
        )

    def train_dataloader(self) -> DataLoader:
        stream = self._stream(self.train_sources, self.sample_cfg, self.resample_to, self.num_workers)
        return self._loader(stream, self._next_train_position, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        # A validation set is often a few shards: use no more workers than this rank has shards.
        _, world = self._rank_world()
        workers = min(self.num_workers, max(1, len(resolve_shards(self.val_sources)) // world))
        workers = workers if self.num_workers else 0
        return self._loader(self._stream(self.val_sources, self.val_cfg, None, workers), lambda batches: (0, 0), workers)

    def _next_train_position(self, batches_per_epoch: int) -> tuple[int, int]:
        """Called as each training iteration begins: continue the data where it stopped.

        The unfinished epoch goes on from its next batch, a finished one gives way to the next
        epoch. The data's own count is the truth, not the Trainer's epoch counter: Lightning,
        resumed from a checkpoint taken at an epoch's last batch, opens an empty remainder of that
        epoch and then counts one epoch too many.
        """
        if self._consumed >= batches_per_epoch:
            self._epoch, self._consumed = self._epoch + 1, 0
        return self._epoch, self._consumed

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        skipped = batch.pop("skipped", [])
        if self.trainer is None or self.trainer.training:
            self._consumed += 1
        if skipped:
            self.record_bad_samples(skipped)
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Resize images and rasterise masks where the batch now lives: on a GPU, at no cost to
        # the data workers.
        return expand_batch(batch, self.sample_cfg.image_size)

    def record_bad_samples(self, records: list[dict]) -> None:
        """Count bad samples and append them to bad_samples.jsonl (one JSON object per line)."""
        self.bad_samples += len(records)
        for record in records:
            log.warning("bad sample skipped: %s %s: %s", record["shard"], record["key"], record["reason"])
        if self.bad_samples_log is not None:
            self.bad_samples_log.parent.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps({**r, "epoch": self._epoch}) + "\n" for r in records)
            # O_APPEND: lines from several ranks never interleave mid-line.
            fd = os.open(self.bad_samples_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._consumed, "bad_samples": self.bad_samples}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._consumed = int(state["epoch"]), int(state["batches"])
        self.bad_samples = int(state.get("bad_samples", 0))


def _as_tuples(values: dict) -> dict:
    """Hydra lists -> tuples for the frozen SampleConfig."""
    return {k: tuple(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig" else v for k, v in values.items()}
