"""What every engine step agrees on: who made a mask, and the edits people make to an image's masks.

Masks travel as SA-1B annotations (`sam_train.data.sa1b`) with one extra field, `provenance`.
An annotation's integer `id` is stable for the life of a dataset: exports carry it (Label
Studio region id `m<id>`, COCO/CVAT annotation id) so that what comes back can say which model
mask a person corrected or deleted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from sam_train.data.convert import Skipped

SOURCES = ("model", "human")
ANN_ID_STRIDE = 1_000_000  # annotation id = image_id * stride + k: unique across a dataset, no state to resume
ACTIONS = ("add", "replace", "delete")
# Click labels that mean "not this object", in every tool we read (Label Studio keypoints, CVAT points).
NEGATIVE_LABELS = frozenset({"negative", "background"})


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second (provenance timestamps)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Provenance:
    """Who or what made a mask, in which engine round, from which labelling task, and when."""

    source: str  # "model" | "human"
    round: int
    annotator: str | None = None
    task_id: str | None = None
    time: str | None = None  # ISO 8601 UTC

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"provenance source must be one of {SOURCES}, got {self.source!r}")

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Provenance":
        if not isinstance(data, dict) or "source" not in data or "round" not in data:
            raise ValueError(f"provenance needs at least source and round, got {data!r}")
        return cls(**{k: data.get(k) for k in ("source", "round", "annotator", "task_id", "time")})


@dataclass(frozen=True)
class Prompt:
    """A prompt a person placed instead of drawing a mask (a Label Studio rectangle or keypoints).

    Coordinates are original-image pixels: `box` is XYXY; `points` are (x, y) with `labels`
    1 = positive, 0 = negative. The engine turns it into a mask with the current model.
    """

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class Edit:
    """One change to one image's masks.

    - add: a new mask (`rle`) or a prompt to segment (`prompt`); `target` is None.
    - replace: `rle` supersedes the annotation whose id is `target` (a person corrected it).
    - delete: the annotation `target` is wrong and goes (a person removed it).
    `rle` is COCO compressed RLE `{"size": [h, w], "counts": str}` at the image's full size.
    """

    image: str  # the sample key of the image
    action: str
    provenance: Provenance
    rle: dict | None = None
    target: int | None = None
    prompt: Prompt | None = None
    label: str | None = None  # the tool's class label, kept for the record
    extra: dict = field(default_factory=dict)  # tool-specific fields worth keeping (e.g. region id)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"edit action must be one of {ACTIONS}, got {self.action!r}")
        if self.action in ("replace", "delete") and self.target is None:
            raise ValueError(f"a {self.action} edit must name the annotation id it changes")
        if self.action in ("add", "replace") and (self.rle is None) == (self.prompt is None):
            raise ValueError(f"an {self.action} edit carries exactly one of a mask (rle) or a prompt")


@dataclass
class Ingested:
    """The edits a correction file or tool export makes, and what it could not say, as (item, reason)."""

    edits: list[Edit] = field(default_factory=list)
    skipped: Skipped = field(default_factory=list)
