"""File backup engine: walk a tree, read what changed, store chunks and trees, save a snapshot.

``run.run_backup`` is the entry point. Change detection is the engine's own: the local
catalog (``catalog``) or the previous snapshot's trees (``previous``)."""
