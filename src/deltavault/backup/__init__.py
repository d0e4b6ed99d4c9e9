"""Backup engines: files (archiver) and volumes."""
