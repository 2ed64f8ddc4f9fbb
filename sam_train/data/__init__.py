"""Data: SA-1B schema and RLE, shards, converters, synthetic data, sample pipeline, distributed iteration."""
