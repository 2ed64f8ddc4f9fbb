"""Small synthetic shard sets shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from sam_train.data.synth import synth_dataset


def make_synth(root: Path, images: int, per_shard: int, seed: int = 0) -> Path:
    out = root / f"synth_{images}_{per_shard}_{seed}"
    if not (out / "manifest.json").exists():
        synth_dataset(out, images=images, seed=seed, samples_per_shard=per_shard, workers=1)
    return out


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def synth_24(synth_root: Path) -> Path:
    """24 samples in 6 shards of 4."""
    return make_synth(synth_root, 24, 4)
