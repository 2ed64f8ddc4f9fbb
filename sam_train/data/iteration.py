"""Which reader reads which samples, in what order: exact, balanced, shuffled, resumable.

Each epoch the shards are permuted (seed + epoch) and their samples laid end to end. The result
is cut into `world_size` contiguous, equal slices (the last wraps around to the start when the
count does not divide, as DistributedSampler pads), and each rank's slice into `num_workers`
near-equal contiguous pieces. A worker streams its pieces (spans of shards), drawing the next
sample from one of `interleave` open spans at random, so a batch mixes several shards.

Every random choice is a pure function of (seed, epoch, rank, worker), and every span length is
known from the manifest, so a saved position (epoch, batches consumed) is resumed by replaying
the choices with no data read, then skipping inside at most `interleave` shards per worker.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from sam_train.data.errors import SampleError
from sam_train.data.shards import RawSample, ShardRef, iter_raw_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Span:
    """Samples [start, end) of one shard."""

    url: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Reader:
    """Where one DataLoader worker of one rank sits in the job."""

    rank: int
    world_size: int
    worker: int
    num_workers: int


def epoch_order(shards: list[ShardRef], seed: int, epoch: int) -> list[ShardRef]:
    """This epoch's shard permutation."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(shards))
    return [shards[i] for i in order]


def cut(spans: list[Span], start: int, count: int) -> list[Span]:
    """Samples [start, start + count) of the concatenation of `spans`, wrapping around at the end."""
    total = sum(len(s) for s in spans)
    out: list[Span] = []
    while count > 0:
        offset = start % total
        for span in spans:
            if offset < len(span):
                take = min(count, len(span) - offset)
                out.append(Span(span.url, span.start + offset, span.start + offset + take))
                count -= take
                start += take
                break
            offset -= len(span)
    return out


def split_evenly(count: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous pieces of `count` items, differing by at most one."""
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def rank_samples(total: int, world_size: int) -> int:
    """Samples each rank reads per epoch: equal on every rank, so DDP ranks take equal steps."""
    return -(-total // world_size)


def worker_spans(shards: list[ShardRef], seed: int, epoch: int, reader: Reader, resample_to: int | None) -> list[Span]:
    """The spans one worker reads this epoch.

    Exact mode (`resample_to` None): its piece of the epoch permutation. Resample mode: whole
    shards drawn with replacement from its own generator until it has `resample_to / readers`.
    """
    readers = reader.world_size * reader.num_workers
    if resample_to is not None:
        rng = np.random.default_rng([seed, epoch, 1, reader.rank, reader.worker])
        quota = split_evenly(resample_to, readers)[reader.rank * reader.num_workers + reader.worker]
        drawn = [shards[i] for i in rng.integers(0, len(shards), size=quota)]  # at least one sample each
        return cut([Span(s.url, 0, s.samples) for s in drawn if s.samples], 0, quota)
    spans = [Span(s.url, 0, s.samples) for s in epoch_order(shards, seed, epoch) if s.samples]
    per_rank = rank_samples(sum(len(s) for s in spans), reader.world_size)
    pieces = split_evenly(per_rank, reader.num_workers)
    start = reader.rank * per_rank + sum(pieces[: reader.worker])
    return cut(spans, start, pieces[reader.worker])


def worker_batches(samples: int, batch_size: int) -> int:
    return -(-samples // batch_size)


def round_robin_position(per_worker_batches: list[int], consumed: int) -> tuple[list[int], int]:
    """After `consumed` batches: how many came from each worker, and which worker is polled next.

    A DataLoader polls its workers round robin, skipping exhausted ones.
    """
    taken = [0] * len(per_worker_batches)
    worker = 0
    while consumed > 0:
        if all(t == b for t, b in zip(taken, per_worker_batches)):
            raise ValueError("saved data position is past the end of the epoch")
        if taken[worker] < per_worker_batches[worker]:
            taken[worker] += 1
            consumed -= 1
        worker = (worker + 1) % len(per_worker_batches)
    return taken, worker


def interleave(spans: list[Span], width: int, rng: np.random.Generator, skip: int) -> list[tuple[Span, int]]:
    """Replay the interleaving choices: the (span, samples already taken) of each open span after `skip` samples.

    Returns the spans still to read, in the order they are opened, with how many of their
    samples were consumed before the resume point.
    """
    pending = list(spans)
    open_spans: list[list] = []  # [span, taken]
    while pending and len(open_spans) < width:
        open_spans.append([pending.pop(0), 0])
    for _ in range(skip):
        i = int(rng.integers(len(open_spans)))
        open_spans[i][1] += 1
        if open_spans[i][1] == len(open_spans[i][0]):
            open_spans.pop(i)
            if pending:
                open_spans.append([pending.pop(0), 0])
    return [(span, taken) for span, taken in open_spans] + [(span, 0) for span in pending]


class ShardStream(IterableDataset):
    """Streams decoded samples for one rank; each DataLoader worker reads its own piece.

    Yields (sample, skipped) pairs: `skipped` lists the bad samples (as `SampleError.as_record()`)
    that this sample stands in for. A bad or empty sample is replaced by the worker's last good
    one, so every rank yields the same number of batches (DDP needs that) and positions stay exact.
    """

    def __init__(
        self,
        shards: list[ShardRef],
        decode: Callable[[RawSample, int], object | None],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        interleave_width: int = 4,
        resample_to: int | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("no shards to read")
        self.shards = shards
        self.decode = decode  # (raw sample, epoch) -> sample, or None when nothing usable is left
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.interleave_width = interleave_width
        self.resample_to = resample_to
        self.strict = strict
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already consumed by this rank (resume)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Read `epoch` from its `start_batch`-th batch on; set before the DataLoader iterates."""
        self.epoch, self.start_batch = epoch, start_batch

    def check_layout(self, num_workers: int) -> None:
        """Exact mode needs a shard per reader; say how to fix it otherwise."""
        readers = self.world_size * max(1, num_workers)
        if self.resample_to is None and len(self.shards) < readers:
            raise ValueError(
                f"{len(self.shards)} shards for {self.world_size} ranks x {max(1, num_workers)} workers: "
                "exact epochs need at least one shard per reader. Write smaller shards "
                "(--samples-per-shard) or set data.resample_to=<samples per epoch> to draw shards with replacement"
            )

    def samples_per_worker(self, num_workers: int) -> list[int]:
        """Samples each worker of this rank yields in an epoch (the same on every rank)."""
        if self.resample_to is not None:
            quotas = split_evenly(self.resample_to, self.world_size * num_workers)
            return quotas[self.rank * num_workers : (self.rank + 1) * num_workers]
        total = sum(s.samples for s in self.shards)
        return split_evenly(rank_samples(total, self.world_size), num_workers)

    def batches_per_epoch(self, num_workers: int) -> int:
        """Batches this rank yields per epoch with `num_workers` DataLoader workers (0 counts as 1)."""
        return sum(worker_batches(n, self.batch_size) for n in self.samples_per_worker(max(1, num_workers)))

    def __iter__(self) -> Iterator[tuple[object, list[dict]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        per_worker = [worker_batches(n, self.batch_size) for n in self.samples_per_worker(num_workers)]
        taken, next_worker = round_robin_position(per_worker, self.start_batch)
        # A fresh DataLoader polls worker 0 first: rotate roles so it plays the one that was next.
        role = (worker + next_worker) % num_workers
        reader = Reader(self.rank, self.world_size, role, num_workers)
        spans = worker_spans(self.shards, self.seed, self.epoch, reader, self.resample_to)
        skip = min(taken[role] * self.batch_size, sum(len(s) for s in spans))
        rng = np.random.default_rng([self.seed, self.epoch, 2, self.rank, role])
        plan = interleave(spans, self.interleave_width, rng, skip)
        yield from self._decoded(self._raw(plan, rng))

    def _raw(self, plan: list[tuple[Span, int]], rng: np.random.Generator) -> Iterator[RawSample]:
        """Interleave the planned spans, continuing the very random choices the replay made."""
        pending = list(plan)
        open_spans: list[list] = []  # [iterator, samples left]

        def open_next() -> None:
            span, taken = pending.pop(0)
            left = len(span) - taken
            open_spans.append([iter_raw_samples(span.url, skip=span.start + taken, limit=left), left, span])

        while pending and len(open_spans) < self.interleave_width:
            open_next()
        while open_spans:
            i = int(rng.integers(len(open_spans)))
            iterator, left, span = open_spans[i]
            try:
                sample = next(iterator, None)
                problem = None if sample is not None else "the shard ends before the count its manifest gives"
            except (tarfile.TarError, OSError, EOFError) as exc:
                problem = f"unreadable from here on ({type(exc).__name__}: {exc})"
            if problem is not None:
                # Keep the promised count (ranks must take equal steps): the lost samples become
                # bad samples, replaced and logged like any other. `data check` tells the details.
                position = span.end - left
                sample = RawSample(span.url, f"#{position}", error=f"sample {position} of the shard: {problem}")
                open_spans[i][0] = iter(())
            yield sample
            open_spans[i][1] -= 1
            if open_spans[i][1] == 0:  # closed exactly when the replay closes it
                open_spans.pop(i)
                if pending:
                    open_next()

    def _decoded(self, raws: Iterator[RawSample]) -> Iterator[tuple[object, list[dict]]]:
        last_good: RawSample | None = None
        owed: list[dict | None] = []  # samples to stand in for: a bad one's record, or None if merely empty
        for raw in raws:
            sample, bad = self._try_decode(raw)
            if sample is not None:
                last_good = raw
                yield sample, []
            else:
                owed.append(bad)
            while owed and last_good is not None:
                stand_in, _ = self._try_decode(last_good)
                skipped = owed.pop(0)
                yield stand_in, [skipped] if skipped else []
        if owed:
            raise ValueError(f"rank {self.rank}: a worker read {len(owed)} samples and none was usable")

    def _try_decode(self, raw: RawSample) -> tuple[object | None, dict | None]:
        try:
            return self.decode(raw, self.epoch), None
        except SampleError as exc:
            if self.strict:
                raise
            log.warning("skipping bad sample %s", exc)
            return None, exc.as_record()
