"""The engine's append-only JSON-lines logs: the step journal and the annotation journal.

Both are written one fsynced line at a time, so whatever a line records survives `kill -9` the
moment `append` returns; a line torn by a crash (the last one, unparseable) is ignored and cut
before the next append.

- `Journal` (journal.jsonl): which step of which round has finished. A step appends `start`
  before it touches anything and `done` (with what it produced) only after all its outputs are on
  disk (atomically written). After `kill -9` at any point, the next run redoes exactly the steps
  without `done`; every step is written so that redoing it neither loses nor duplicates anything.
- `AnnotationJournal` (annotations.jsonl): every annotation event Label Studio's webhooks
  deliver to our ML backend (`sam-train serve`), in arrival order. The engine folds it into the
  latest submitted annotation of each task, shaped like a Label Studio export, and ingests that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sam_train.engine.records import now_iso

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")


class JsonLines:
    """An append-only file of JSON objects, one per line, each durable when `append` returns."""

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

    def append_entry(self, entry: dict) -> None:
        """Append one object and fsync before returning."""
        line = json.dumps(entry, separators=(",", ":"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        with open(self.path, "ab") as f:
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

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


class Journal(JsonLines):
    """Append-only step log of one engine work folder."""

    def append(self, event: str, round: int, step: str, **outputs: object) -> None:
        """Record an event durably before returning."""
        self.append_entry({"event": event, "round": round, "step": step, "time": now_iso(), **outputs})

    def done(self) -> dict[tuple[int, str], dict]:
        """(round, step) -> the `done` entry of every finished step."""
        return {(e["round"], e["step"]): e for e in self.entries() if e.get("event") == "done"}


class AnnotationJournal(JsonLines):
    """Annotation events from Label Studio webhooks, and the tasks they leave annotated."""

    def record(self, payload: dict) -> bool:
        """Keep a webhook payload if it is an annotation event (True); other actions are not ours (False).

        Raises ValueError, naming what is missing, for an annotation event without its task or annotation.
        """
        action = payload.get("action") if isinstance(payload, dict) else None
        if action not in ANNOTATION_EVENTS:
            return False
        if action == "ANNOTATIONS_DELETED":
            if not isinstance(payload.get("annotations"), list):
                raise ValueError(f"{action} webhook without an annotations list")
        else:
            for part in ("task", "annotation"):
                if not isinstance(payload.get(part), dict):
                    raise ValueError(f"{action} webhook without its {part} (Label Studio sends it with send_payload)")
        self.append_entry({"received": now_iso(), **payload})
        return True

    def tasks(self) -> list[dict]:
        """Each task with its annotations as the events left them, in first-seen order: the shape of a
        Label Studio JSON export, so `labelstudio.parse_export` reads it like one."""
        tasks: dict[int, dict] = {}
        annotations: dict[int, dict[int, dict]] = {}
        for entry in self.entries():
            if entry.get("action") == "ANNOTATIONS_DELETED":
                deleted = {a.get("id") for a in entry["annotations"] if isinstance(a, dict)}
                for by_id in annotations.values():
                    for annotation_id in deleted & set(by_id):
                        del by_id[annotation_id]
                continue
            task, annotation = entry["task"], entry["annotation"]
            tasks[task["id"]] = {k: v for k, v in task.items() if k not in ("annotations", "predictions", "drafts")}
            annotations.setdefault(task["id"], {})[annotation["id"]] = annotation
        return [{**task, "annotations": list(annotations[task_id].values())} for task_id, task in tasks.items()]
