"""File-system helpers shared by backup, restore and sync."""
