"""deltavault: backup and sync that moves only what changed."""

__version__ = "0.1.0"
