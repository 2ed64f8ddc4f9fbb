"""The data engine: auto-label, export for correction, ingest corrections, retrain, repeat."""
