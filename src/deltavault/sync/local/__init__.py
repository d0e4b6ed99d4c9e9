"""The local sync engine: the sender's and the receiver's pieces connected in one process
(and its worker processes). ``engine.Syncer`` is the entry point."""
