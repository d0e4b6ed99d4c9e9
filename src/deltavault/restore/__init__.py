"""Restore engines: files, volumes, mount."""
