"""Object layer: turning content references into bytes and back (patches, readers)."""
