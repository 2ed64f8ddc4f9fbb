"""`sam-train embed` as several processes: ranks write what one process writes, a rank killed mid-way and
rerun loses and doubles nothing, and the manifest keys the cache to the checkpoint that made it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sam_train.data.embeddings import EmbeddingCache
from sam_train.data.shards import read_manifest
from sam_train.embed import check_cache_fits
from sam_train.model import build_sam
from tests.conftest import make_synth, process_env

pytestmark = pytest.mark.slow  # multi-process runs


def start_embed(dataset: Path, out: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "sam_train.cli", "embed", "builtin", str(dataset), str(out), "samples_per_shard=1",
               "--device", "cpu", *args]
    return subprocess.Popen(command, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return stdout


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {entry["name"]: (out / entry["name"]).read_bytes() for entry in read_manifest(out)["shards"]}


def test_two_ranks_killed_and_rerun_write_what_one_process_writes(synth_root, tmp_path):
    dataset = make_synth(synth_root, 4, 2)
    single = start_embed(dataset, tmp_path / "single")
    ranks = [start_embed(dataset, tmp_path / "ranks", "--rank", str(r), "--world-size", "2") for r in (0, 1)]
    first = tmp_path / "ranks" / "embeddings-000000.tar"
    while not first.exists() and ranks[0].poll() is None:
        time.sleep(0.05)
    os.kill(ranks[0].pid, signal.SIGKILL)  # after its first shard: rank 0 owns shards 0 and 2
    ranks[0].communicate()
    assert "rank 1 of 2: 2 embedded now" in finish(ranks[1])
    rerun = finish(start_embed(dataset, tmp_path / "ranks", "--rank", "0", "--world-size", "2"))
    assert "rank 0 of 2: 1 embedded now" in rerun or "rank 0 of 2: 0 embedded now" in rerun, rerun
    assert "4 embeddings (plain; bfloat16) in 4 shards" in finish(start_embed(dataset, tmp_path / "ranks", "--finalize"))
    finish(single)
    assert shard_bytes(tmp_path / "ranks") == shard_bytes(tmp_path / "single")  # bit for bit, in any process layout
    assert read_manifest(tmp_path / "ranks")["source"] == read_manifest(tmp_path / "single")["source"]

    cache = EmbeddingCache(tmp_path / "single")
    builtin = build_sam("tiny", pretrained=True).requires_grad_(False)
    check_cache_fits(builtin, cache)
    with pytest.raises(ValueError, match=r"another image encoder or preprocessing \(encoder_sha256: cache '[0-9a-f]{64}'"):
        check_cache_fits(build_sam("tiny").requires_grad_(False), cache)  # same architecture, other weights
    other = start_embed(dataset, tmp_path / "single", "dtype=float16")  # a different cache into the same folder
    _, stderr = other.communicate(timeout=120)
    assert other.returncode == 2 and "already holds shards of another" in stderr, stderr
