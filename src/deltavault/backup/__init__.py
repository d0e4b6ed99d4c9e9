"""Backup engines, one package each: ``files`` (file trees) and ``volume`` (block devices and
disk images). They share nothing but the layers below them."""
