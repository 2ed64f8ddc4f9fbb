"""Embedding caches: the image encoder's output for every sample, stored once and read by sample key.

A frozen encoder gives the same embedding for the same canvas every epoch, and it is most of a
step's cost (docs/training.md, decoder-only fine-tuning), so decoder-only training
reads it instead. A cache is a dataset folder written like any other
(`write_shards` / `finish_dataset`: several ranks, resumable) whose samples hold one member,
`<key>.safetensors`, with the embedding of the sample's canvas (`plain`) and, when cached, of its
mirror image (`hflip`), in half precision (256 x 64 x 64 x 2 bytes = 2 MiB per vit_b canvas).
Safetensors rather than pickle: a cache may come from anywhere and is only ever parsed as data.
The manifest's `source` says what made it (image-encoder weights, input size, pixel statistics,
canvas version); `sam_train.embed.check_cache_fits` compares that with the model in training.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sam_train.data.pipeline import SampleConfig
from sam_train.data.shards import read_manifest, split_member_name

CACHE_FORMAT = "sam-train-embeddings"
MEMBER = "safetensors"
PLAIN, HFLIP = "plain", "hflip"  # the canvas as placed, and mirrored (for data.sample.hflip_prob > 0)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class MissingEmbeddingError(ValueError):
    """A sample that training reads has no embedding in the cache."""


def pack_embeddings(variants: dict[str, torch.Tensor], dtype: str) -> bytes:
    """Variant name -> C x h x w embedding, as the bytes of one cache member."""
    return save_safetensors({name: e.detach().to("cpu", DTYPES[dtype]).contiguous() for name, e in variants.items()})


def unpack_embedding(data: bytes, flip: bool) -> torch.Tensor:
    """The C x h x w float32 embedding of one variant from a cache member's bytes."""
    return load_safetensors(data)[HFLIP if flip else PLAIN].float()


class EmbeddingCache:
    """Lookups by sample key into a finished cache folder; DataLoader workers each read their own."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest["format"] != CACHE_FORMAT:
            raise ValueError(f"{self.folder} holds {manifest['format']!r} samples, not image embeddings: "
                             "data.embedding_cache takes a folder written by `sam-train embed`")
        self.source = manifest["source"]
        self.shards = [str(self.folder / entry["name"]) for entry in manifest["shards"]]
        self._where = _member_index(self.shards)  # key -> (shard, byte offset, size)

    @property
    def variants(self) -> list[str]:
        return list(self.source["variants"])

    def __len__(self) -> int:
        return len(self._where)

    def check_augmentation(self, cfg: SampleConfig) -> None:
        """Refuse augmentations that change the encoder's input to a canvas the cache does not hold."""
        if cfg.jitter_scale:
            raise ValueError(
                f"data.sample.jitter_scale={list(cfg.jitter_scale)} rescales and crops each image anew every epoch:"
                f" no cached embedding fits. Set data.sample.jitter_scale=null to train from {self.folder},"
                " or data.embedding_cache=null to run the image encoder"
            )
        if cfg.hflip_prob > 0 and HFLIP not in self.variants:
            raise ValueError(
                f"data.sample.hflip_prob={cfg.hflip_prob} mirrors images, but {self.folder} holds no mirrored"
                " embeddings: rebuild it with `sam-train embed ... hflip=true`, or set data.sample.hflip_prob=0"
            )

    def load(self, key: str, flip: bool) -> torch.Tensor:
        """The C x h x w embedding of sample `key`'s canvas (mirrored if `flip`), as float32."""
        try:
            shard, offset, size = self._where[key]
        except KeyError:
            raise MissingEmbeddingError(
                f"sample {key!r} has no embedding in {self.folder}: embed every shard training reads"
                f" (`sam-train embed CKPT SHARDS... {self.folder}` with data.train and data.val)"
            ) from None
        with open(shard, "rb") as f:
            f.seek(offset)
            return unpack_embedding(f.read(size), flip)


def _member_index(shards: list[str]) -> dict[str, tuple[str, int, int]]:
    """Where each key's member lies in the (uncompressed) shards, from the tar headers alone."""
    where: dict[str, tuple[str, int, int]] = {}
    for shard in shards:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                key, ext = split_member_name(info.name)
                if info.isreg() and ext == MEMBER:
                    where[key] = (shard, info.offset_data, info.size)
                tar.members = []  # keep memory flat on big shards
    return where
