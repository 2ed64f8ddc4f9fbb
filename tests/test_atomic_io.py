"""Atomic writes: a failed write leaves the previous file intact and no temporary behind."""

from __future__ import annotations

import pytest

from sam_train.atomic_io import atomic_path, atomic_write_bytes


def test_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "manifest.json"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_failure_mid_write_keeps_previous_content(tmp_path):
    target = tmp_path / "weights.pth"
    target.write_bytes(b"good old weights")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"good old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pth"]
