"""Distribution-correct iteration: exactly once per epoch across ranks x workers, exact resume, resampling."""

from __future__ import annotations

from collections import Counter
from functools import partial

import pytest
from torch.utils.data import DataLoader

from sam_train.data.datamodule import SA1BDataModule, collate_stream, decode_for_stream
from sam_train.data.iteration import ShardStream, round_robin_position
from sam_train.data.pipeline import SampleConfig
from sam_train.data.shards import resolve_shards
from tests.conftest import make_synth

CFG = SampleConfig(image_size=64, mask_stride=4)


def stream_for(dataset, rank: int, world: int, batch_size: int = 3, **kw) -> ShardStream:
    return ShardStream(
        resolve_shards([str(dataset)]), decode=partial(decode_for_stream, CFG, 0), batch_size=batch_size,
        rank=rank, world_size=world, **kw,
    )


def batches(stream: ShardStream, workers: int, epoch: int = 0, start: int = 0) -> list[list[str]]:
    stream.set_position(epoch, start)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, collate_fn=collate_stream)
    return [batch["keys"] for batch in loader]


def all_keys(dataset) -> list[str]:
    from sam_train.data.shards import iter_raw_samples

    return [s.key for ref in resolve_shards([str(dataset)]) for s in iter_raw_samples(ref.url)]


def test_every_sample_exactly_once_across_2_ranks_x_2_workers(synth_24):
    per_rank = [batches(stream_for(synth_24, rank, 2), workers=2) for rank in range(2)]
    seen = [key for rank in per_rank for batch in rank for key in batch]
    assert Counter(seen) == Counter(all_keys(synth_24))
    assert len(per_rank[0]) == len(per_rank[1]) == stream_for(synth_24, 0, 2).batches_per_epoch(2)


def test_uneven_count_pads_so_ranks_take_equal_steps(synth_root):
    dataset = make_synth(synth_root, 25, 5)
    per_rank = [batches(stream_for(dataset, rank, 2), workers=2) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    seen = Counter(key for rank in per_rank for batch in rank for key in batch)
    assert set(seen) == set(all_keys(dataset))
    assert sum(seen.values()) == 26  # 13 per rank: one sample read twice, as DistributedSampler pads


def test_order_is_deterministic_and_changes_with_epoch(synth_24):
    a = batches(stream_for(synth_24, 0, 1), workers=2, epoch=3)
    b = batches(stream_for(synth_24, 0, 1), workers=2, epoch=3)
    c = batches(stream_for(synth_24, 0, 1), workers=2, epoch=4)
    assert a == b
    assert a != c and sorted(sum(a, [])) == sorted(sum(c, []))


@pytest.mark.parametrize("start", [1, 2, 3, 5, 7])
def test_resume_continues_without_repeats_or_gaps(synth_root, start):
    # 26 samples per rank, 2 workers (13 each), batch 4: workers end with partial batches, and
    # round-robin polling has to skip the exhausted worker at the end.
    dataset = make_synth(synth_root, 26, 3)
    full = batches(stream_for(dataset, 0, 1, batch_size=4), workers=2, epoch=1)
    resumed = batches(stream_for(dataset, 0, 1, batch_size=4), workers=2, epoch=1, start=start)
    assert resumed == full[start:]


def test_round_robin_model_of_the_dataloader():
    assert round_robin_position([3, 2], 4) == ([2, 2], 0)
    assert round_robin_position([3, 2], 5) == ([3, 2], 1)
    assert round_robin_position([1, 3], 3) == ([1, 2], 0)
    with pytest.raises(ValueError, match="past the end"):
        round_robin_position([1, 1], 3)


def test_fewer_shards_than_readers_is_refused_with_the_fix(synth_root):
    dataset = make_synth(synth_root, 6, 6)  # one shard
    with pytest.raises(ValueError, match="1 shards for 2 ranks x 2 workers.*resample_to"):
        stream_for(dataset, 0, 2).check_layout(2)


def test_resample_mode_reads_a_single_shard_from_every_reader(synth_root):
    dataset = make_synth(synth_root, 6, 6)
    per_rank = [batches(stream_for(dataset, rank, 2, resample_to=20), workers=2) for rank in range(2)]
    counts = [sum(len(b) for b in rank) for rank in per_rank]
    assert counts == [10, 10]
    assert set(sum(sum(per_rank, []), [])) <= set(all_keys(dataset))


def test_datamodule_state_resumes_mid_epoch(synth_24):
    def datamodule() -> SA1BDataModule:
        return SA1BDataModule([str(synth_24)], image_size=64, sample={"mask_stride": 4}, batch_size=2,
                              num_workers=2, pin_memory=False)

    first = datamodule()
    full = []
    for i, batch in enumerate(first.train_dataloader()):
        batch = first.on_before_batch_transfer(batch, 0)
        full.append(batch["keys"])
        if i == 4:
            state = first.state_dict()
    assert state["batches"] == 5
    second = datamodule()
    second.load_state_dict(state)
    rest = [second.on_before_batch_transfer(b, 0)["keys"] for b in second.train_dataloader()]
    assert rest == full[5:]


def test_datamodule_is_built_from_the_hydra_config(synth_24):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sam_train.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="data/synthetic", overrides=[f"data.train=[{synth_24}]", "data.num_workers=0"])
    dm = instantiate(cfg.data, image_size=64)
    assert dm.sample_cfg.mask_stride == 4 and dm.sample_cfg.hflip_prob == 0.5
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0), 0)
    assert batch["images"].shape == (4, 3, 64, 64) and batch["masks"].shape[1:] == (16, 16)
    assert dm.state_dict()["batches"] == 1
