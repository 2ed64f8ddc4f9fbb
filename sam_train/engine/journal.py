"""The engine's journal: an append-only JSON-lines record of which step of which round has finished.

A step appends `start` before it touches anything and `done` (with what it produced) only after
all its outputs are on disk (atomically written). After `kill -9` at any point, the next run
redoes exactly the steps without `done`; every step is written so that redoing it neither loses
nor duplicates anything. Each line is flushed and fsynced; a line torn by a crash (the last one,
unparseable) is ignored, since the step it announced has no `done` either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sam_train.engine.records import now_iso


class Journal:
    """Append-only step log of one engine work folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict]:
        """Every complete line, in order."""
        if not self.path.exists():
            return []
        out = []
        lines = self.path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number < len(lines) - 1:  # only the last line can be torn by a crash
                    raise ValueError(f"{self.path}:{number}: corrupt journal line (not the last one): {line[:80]!r}") from exc
        return out

    def append(self, event: str, round: int, step: str, **outputs: object) -> None:
        """Record an event durably before returning."""
        line = json.dumps({"event": event, "round": round, "step": step, "time": now_iso(), **outputs})
        self._drop_torn_tail()
        with open(self.path, "ab") as f:
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def done(self) -> dict[tuple[int, str], dict]:
        """(round, step) -> the `done` entry of every finished step."""
        return {(e["round"], e["step"]): e for e in self.entries() if e.get("event") == "done"}

    def _drop_torn_tail(self) -> None:
        """Cut a last line a crash left without its newline, so the next line starts clean."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        with open(self.path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())
