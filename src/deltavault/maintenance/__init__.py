"""Maintenance engines: check, repair, prune, retention (forget) and stats.

They work on a whole repository through ``deltavault.repository``; backup, restore and
sync never need them.
"""
