"""Snapshots as a read-only file system (FUSE), and random access to stored content.

``blobs.py`` reads blobs through a bounded cache and survives a concurrent prune;
``views.py`` reads a file's or a volume's bytes at any offset from its content references;
``namespace.py`` lays the repository out as directories; ``fuseops.py`` answers the kernel;
``session.py`` mounts and unmounts. docs/design.md, "Mount", has the design.
"""
