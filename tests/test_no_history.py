"""No development history in the repository: text says what a thing is and why, never which session found it.

In this project a session is one object's interactive click session. A number right after the word
("session N", "run_id=sessionN-...", "csv/session_NNN") names a development session or a numbered
log folder instead, and neither belongs in code, configs, tests, scripts or docs.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# "session N", "sessions N-M", "Session #N", "sessionN-name", "session_NNN", for any digits N, M.
HISTORY = re.compile(r"\bsessions?[ _#-]?\d", re.IGNORECASE)


def history_lines(text: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of every line of `text` that names a numbered session."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if HISTORY.search(line)]


def tracked_text_files() -> list[Path]:
    """The repository's tracked files that exist in the working tree and decode as UTF-8 text."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing lists the tracked files")
    files = []
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet in the index
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # weights, images
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_the_pattern_catches_numbered_sessions_and_spares_click_sessions():
    n = 25  # samples built from a number, so this file's own text holds no history
    for history in (f"Since session {n}", f"before session {n - 6}", f"(session {n - 12}'s weights)",
                    f"run_id=session{n}-muon", f"csv/session_{n:03d}/metrics.csv", f"sessions {n - 5}-{n}"):
        assert HISTORY.search(history), history
    for legitimate in ('@pytest.fixture(scope="session")', "a click session of 5 clicks", "start_new_session=True",
                       "m.session_prompts()", "SESSIONS_PER_BATCH = 6", "draw_sessions(module, batch, 5)"):
        assert not HISTORY.search(legitimate), legitimate


def test_no_tracked_file_names_a_development_session():
    hits = [f"{path.relative_to(ROOT)}:{n}: {line}"
            for path in tracked_text_files() for n, line in history_lines(path.read_text(encoding="utf-8"))]
    assert not hits, "development history (say what and why instead):\n" + "\n".join(hits)
