"""Data: synthetic SA-1B-style scenes (and, next, shards, samples and transforms)."""
