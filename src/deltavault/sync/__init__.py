"""Mirror a directory tree (optionally from a point-in-time snapshot) with delta transfer.

Laid out by role: ``sender`` reads SRC, ``receiver`` writes DST, ``wire`` is the protocol
between them over ssh, ``push`` and ``pull`` connect a local side to a remote one, and
``local`` connects both in one process (``local.engine.Syncer``). docs/architecture.md,
*Inside sync*, says which module does what."""
