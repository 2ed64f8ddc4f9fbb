"""The one error type for a bad sample: it always names the shard, the key and the reason."""

from __future__ import annotations


class SampleError(ValueError):
    """A sample that cannot be used. Training skips and counts these (strict mode raises)."""

    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(f"{shard} {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason

    def as_record(self) -> dict[str, str]:
        """JSON-ready form for bad_samples.jsonl."""
        return {"shard": self.shard, "key": self.key, "reason": self.reason}


class ShardLayoutError(ValueError):
    """A shard whose structure (not one sample) is broken, e.g. members of a sample not adjacent."""
