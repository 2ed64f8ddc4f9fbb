"""Embedding caches as training reads them: each sample's cached embedding is the encoder's output for the
very canvas the pipeline builds (its flip chosen by the sample's own generator); unusable settings are refused."""

from __future__ import annotations

import pytest
import torch

from sam_train.config import load_config
from sam_train.data.datamodule import SA1BDataModule, decode_for_stream
from sam_train.data.embeddings import EmbeddingCache, MissingEmbeddingError
from sam_train.data.pipeline import SampleConfig, collate, expand_batch
from sam_train.data.shards import iter_raw_samples, resolve_shards
from sam_train.embed import embed_shards
from sam_train.model import build_sam
from tests.conftest import make_synth


@pytest.fixture(scope="module")
def model():
    return build_sam("tiny", pretrained=True).eval()


@pytest.fixture(scope="module")
def dataset(synth_root):
    return make_synth(synth_root, 6, 2)


@pytest.fixture(scope="module")
def cache(model, dataset, tmp_path_factory) -> EmbeddingCache:
    out = tmp_path_factory.mktemp("cache")
    embed_shards(model, [dataset], out, load_config("embed", ["hflip=true", "samples_per_shard=4"]))
    return EmbeddingCache(out)


def test_a_samples_cached_embedding_is_the_encoders_output_for_its_training_canvas(model, dataset, cache):
    cfg = SampleConfig(image_size=model.image_size, max_masks=4, hflip_prob=0.5)
    flips = set()
    for raw in (r for ref in resolve_shards([dataset]) for r in iter_raw_samples(ref.url)):
        for epoch in (0, 1):
            sample = decode_for_stream(cfg, 0, raw, epoch, cache=cache)
            flips.add(sample.flip)
            batch = expand_batch(collate([sample]), model.image_size)
            with torch.no_grad():
                expected = model.encode_image(model.normalize_canvas(batch["images"], batch["content_sizes"]))
            assert batch["embeddings"].dtype == torch.float32 and batch["embeddings"].shape == expected.shape
            torch.testing.assert_close(batch["embeddings"], expected, rtol=1e-2, atol=1e-2)  # bf16 storage
    assert flips == {False, True}, "both variants are read"
    assert len(cache) == 6 and cache.variants == ["plain", "hflip"]


def test_augmentations_the_cache_does_not_hold_and_unknown_keys_are_refused(dataset, cache, model, tmp_path):
    with pytest.raises(ValueError, match=r"data\.sample\.jitter_scale=\[0\.5, 1\.5\].*jitter_scale=null"):
        SA1BDataModule([str(dataset)], image_size=256, sample={"jitter_scale": [0.5, 1.5]}, embedding_cache=str(cache.folder))
    plain = tmp_path / "plain"
    embed_shards(model, [dataset], plain, load_config("embed", ["samples_per_shard=8"]))
    with pytest.raises(ValueError, match=r"hflip_prob=0\.5 mirrors images.*hflip=true"):
        SA1BDataModule([str(dataset)], image_size=256, sample={"hflip_prob": 0.5}, embedding_cache=str(plain))
    SA1BDataModule([str(dataset)], image_size=256, sample={"hflip_prob": 0.0}, embedding_cache=str(plain))
    with pytest.raises(MissingEmbeddingError, match="'elsewhere' has no embedding in .*sam-train embed"):
        cache.load("elsewhere", flip=False)
    with pytest.raises(ValueError, match="not image embeddings"):
        EmbeddingCache(dataset)
