"""Shard reading: raw SA-1B tars in place, adjacency, skip/limit, unsafe member paths, atomic writes."""

from __future__ import annotations

import io
import tarfile

import pytest

from sam_train.data.errors import ShardLayoutError
from sam_train.data.shards import iter_raw_samples, resolve_shards, write_shard


def raw_tar(path, members: list[tuple[str, bytes]]) -> None:
    """A tar as SA-1B ships them (written by tarfile, './' prefixes), not by our writer."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_raw_sa1b_tars_are_read_in_place_without_a_manifest(tmp_path):
    raw_tar(tmp_path / "sa_000000.tar", [("./sa_1.jpg", b"j1"), ("./sa_1.json", b"{}"), ("./sa_2.jpg", b"j2"), ("./sa_2.json", b"{}")])
    raw_tar(tmp_path / "sa_000001.tar", [("sa_3.jpg", b"j3"), ("sa_3.json", b"{}")])
    refs = resolve_shards([str(tmp_path)])
    assert [(r.url.rsplit("/", 1)[1], r.samples) for r in refs] == [("sa_000000.tar", 2), ("sa_000001.tar", 1)]
    samples = [s for r in refs for s in iter_raw_samples(r.url)]
    assert [(s.key, sorted(s.members)) for s in samples] == [("sa_1", ["jpg", "json"]), ("sa_2", ["jpg", "json"]), ("sa_3", ["jpg", "json"])]
    assert samples[1].members["jpg"] == b"j2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sa_000000.tar", "sa_000001.tar"], "nothing extracted"


def test_non_adjacent_members_stop_the_reader_with_the_fix(tmp_path):
    raw_tar(tmp_path / "mixed.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.json", b"{}"), ("b.json", b"{}")])
    with pytest.raises(ShardLayoutError, match="members of sample 'a' are not adjacent.*sam-train data convert"):
        list(iter_raw_samples(str(tmp_path / "mixed.tar")))


def test_skip_and_limit_select_a_span_without_reading_the_rest(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [(f"k{i}", {"jpg": bytes([i]), "json": b"{}"}) for i in range(6)])
    assert [s.key for s in iter_raw_samples(str(path), skip=2, limit=3)] == ["k2", "k3", "k4"]
    assert [s.key for s in iter_raw_samples(str(path), skip=5)] == ["k5"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.tar"], "the shard is written atomically, no temp left"


def test_unsafe_member_paths_mark_the_sample_bad_and_are_never_extracted(tmp_path):
    raw_tar(tmp_path / "evil.tar", [("x.jpg", b"1"), ("x.json", b"{}"), ("../y.jpg", b"2"), ("../y.json", b"{}"), ("/z.json", b"{}")])
    samples = list(iter_raw_samples(str(tmp_path / "evil.tar")))
    assert samples[0].error is None
    assert "climbs out of the archive" in samples[1].error
    assert "is absolute" in samples[2].error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]
