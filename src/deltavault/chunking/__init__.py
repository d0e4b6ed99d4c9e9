"""Chunking: content-defined (FastCDC), fixed blocks, page digests, RDC signatures."""
