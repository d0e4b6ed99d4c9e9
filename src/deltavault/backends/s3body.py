"""Reading an S3 response's body into an anonymous mapping (S3Backend.get_sized).

As bytes, a 32 MiB pack was allocated in the reading thread's malloc arena, which the
allocator tuning of platform.py (large blocks kept in the heap, trimmed at 512 MiB) never
gives back: a restore's reading threads each kept a few packs' worth, 430-590 MB peak RSS
against 150 MB from a local repository (issue #17). A mapping is outside the arenas and
goes back to the system when the last reference to it is dropped.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

from deltavault.errors import BackendError

# urllib3's readinto reads a temporary of the size asked, then copies it: small pieces keep
# that temporary small (and reused in the heap).
PIECE = 1024 * 1024


def read_mapped(name: str, response: dict[str, Any], reserve: Callable[[int], None]) -> bytes | mmap.mmap:
    """The body of a botocore ``get_object`` response, after ``reserve`` of its length; the
    body is closed whatever happens."""
    body = response["Body"]
    n = int(response.get("ContentLength", 0))
    try:
        reserve(n)
        if n == 0:
            return b""
        buf = mmap.mmap(-1, n)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                k = body.readinto(view[got:got + PIECE])
                if not k:
                    raise BackendError(f"{name}: the response ended after {got} of {n} bytes")
                got += k
        finally:
            view.release()
        return buf
    finally:
        body.close()
