"""Change sources: what changed since the previous run (catalog, fs metadata, bitmaps...)."""
