"""The engine journal survives a crash mid-line and never hides real corruption."""

from __future__ import annotations

import pytest

from sam_train.engine.journal import Journal


def test_done_steps_and_a_torn_last_line(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append("start", 1, "train")
    journal.append("done", 1, "train", trained=False)
    journal.append("start", 1, "autolabel")
    with open(journal.path, "ab") as f:
        f.write(b'{"event": "done", "round": 1, "st')  # kill -9 in the middle of a write
    assert list(journal.done()) == [(1, "train")] and journal.done()[(1, "train")]["trained"] is False
    journal.append("done", 1, "autolabel", images=3)  # the torn tail is cut, not glued to this line
    assert list(journal.done()) == [(1, "train"), (1, "autolabel")]
    assert len(journal.path.read_text().splitlines()) == 4


def test_a_corrupt_line_before_the_end_is_an_error(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"event": "done", "round": 1, "step": "train"}\nnot json\n{"event": "start", "round": 1, "step": "x"}\n')
    with pytest.raises(ValueError, match="journal.jsonl:2: corrupt journal line"):
        Journal(path).entries()
