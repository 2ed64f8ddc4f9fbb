"""Decoder-only training from an embedding cache: `fit` with data.embedding_cache gives the losses of the same
run with the frozen encoder running, and refuses a cache of another model or an encoder that trains."""

from __future__ import annotations

import pytest

from sam_train.config import load_config
from sam_train.embed import embed_shards
from sam_train.model import build_sam
from sam_train.report import read_log
from sam_train.train import fit
from tests.conftest import make_synth


@pytest.fixture(scope="module")
def dataset(synth_root):
    return make_synth(synth_root, 8, 2)


@pytest.fixture(scope="module")
def cache(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    embed_shards(build_sam("tiny", pretrained=True), [dataset], out, load_config("embed", ["hflip=true"]))
    return out


def overrides(tmp_path, dataset, *extra: str) -> list[str]:
    return [
        "experiment=quickstart", f"output_root={tmp_path}", "run_dir=null", "run_id=test", "total_steps=3",
        "checkpoint_every=100", f"data.train=[{dataset}]", f"data.val=[{dataset}]", "data.synthesize=null",
        "data.num_workers=0", "data.batch_size=2", "data.sample.hflip_prob=0.5", "model.pretrained=true",
        "model.finetune.freeze_image_encoder=true", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "trainer.val_check_interval=null",
        # fp32: under bf16 autocast the running encoder's output is rounded otherwise than the cache's
        # bf16 copy, and the clicks, which follow the predictions, carry that into the next rounds' losses
        "trainer.precision=32-true", *extra,
    ]


def train_losses(run) -> dict[int, float]:
    return {int(r["step"]): r["train/loss"] for r in read_log(run) if "train/loss" in r}


@pytest.mark.slow
def test_training_from_the_cache_gives_the_frozen_encoders_losses(tmp_path, dataset, cache):
    encoder = fit(load_config("fit", overrides(tmp_path / "encoder", dataset)))
    cached = fit(load_config("fit", overrides(tmp_path / "cached", dataset, f"data.embedding_cache={cache}")))
    expected, got = train_losses(encoder), train_losses(cached)
    assert sorted(got) == sorted(expected) == [0, 1, 2]
    for step in got:  # the same data, flips, prompts and weights: only the bf16 storage of the embeddings differs
        assert got[step] == pytest.approx(expected[step], rel=1e-2), (step, got, expected)


def test_a_cache_of_another_model_or_a_trainable_encoder_is_refused(tmp_path, dataset, cache):
    with pytest.raises(ValueError, match=r"made by another image encoder or preprocessing \(encoder_sha256: cache '\w+'"):
        fit(load_config("fit", overrides(tmp_path, dataset, f"data.embedding_cache={cache}", "model.pretrained=false")))
    with pytest.raises(ValueError, match=r"the image encoder trains .*model\.finetune\.freeze_image_encoder=true"):
        fit(load_config("fit", overrides(tmp_path, dataset, f"data.embedding_cache={cache}",
                                         "model.finetune.freeze_image_encoder=false")))
    with pytest.raises(ValueError, match=r"model\.drop_path > 0"):
        fit(load_config("fit", overrides(tmp_path, dataset, f"data.embedding_cache={cache}", "model.drop_path=0.1")))
