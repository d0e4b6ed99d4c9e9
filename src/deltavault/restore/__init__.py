"""Restore engines: file trees (``files``) and volumes (``volume``)."""
