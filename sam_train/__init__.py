"""sam-train: train Segment-Anything-style models on SA-1B-style data and grow the data with a data engine."""

__version__ = "0.1.0"
