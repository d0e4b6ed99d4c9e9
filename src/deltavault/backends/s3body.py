"""Reading an S3 response's body into an anonymous mapping (S3Backend.get_sized).

As bytes, a 32 MiB pack was allocated in the reading thread's malloc arena, which the
allocator tuning of platform.py (large blocks kept in the heap, trimmed at 512 MiB) never
gives back: a restore's reading threads each kept a few packs' worth, 430-590 MB peak RSS
against 150 MB from a local repository (issue #17). A mapping is outside the arenas and
goes back to the system when the last reference to it is dropped.

The mapping is private, not shared: ``mmap(-1, n)`` is MAP_SHARED, whose pages live in
shmem and cost more to fault in and to unmap. The body goes from the socket straight into
it (``http.client``'s ``readinto``, one ``recv_into`` after another), where urllib3's
``readinto`` reads each piece into a temporary and copies it. Measured on 6 packs of 34 MB
from SeaweedFS, client CPU: 194 ms (shared, 1 MiB pieces through urllib3), 119 ms (this).
Only a plain body takes that path (botocore's ``StreamingBody`` over urllib3 over
``http.client``, nothing read yet, no content decoding, not chunked); anything else, a
body that botocore checks against a checksum the store sent for one, is read through its
own ``readinto``. Either way the bytes are authenticated later, blob by blob (AES-GCM and
the BLAKE3 id, repository/envelope.py); what is checked here is the length.
"""

from __future__ import annotations

import http.client
import mmap
from collections.abc import Callable
from typing import Any

from deltavault.backends.limits import check_size, read_bounded, whole_limit
from deltavault.errors import BackendError

# urllib3's readinto reads a temporary of the size asked, then copies it: small pieces keep
# that temporary small (and reused in the heap).
PIECE = 1024 * 1024


def check_range(name: str, response: dict[str, Any], offset: int, most: int) -> int:
    """The length of a ranged ``get_object`` response's body, checked before any of it is
    read against the range asked for: ``most`` bytes at most from ``offset`` (a negative
    offset: the last bytes). A store that ignores the range answers the whole object (200,
    no Content-Range): read, that was the wrong bytes, or gigabytes held for a few asked."""
    n = int(response.get("ContentLength", 0) or 0)
    crange = str(response.get("ContentRange") or "")
    start = crange.removeprefix("bytes ").partition("-")[0]
    if n > most or n < 0:
        raise BackendError(f"{name}: the S3 server answered {n} bytes for a range of {most}", retryable=False)
    if offset >= 0 and start != str(offset) and not (offset == 0 and not crange):
        raise BackendError(f"{name}: the S3 server answered the range {crange or 'of the whole object'!r} "
                           f"when asked from byte {offset}", retryable=False)
    total = crange.rpartition("/")[2]
    if offset >= 0 and total.isdigit() and n < min(most, int(total) - offset):
        raise BackendError(f"{name}: the S3 server answered {n} bytes of the {min(most, int(total) - offset)} "
                           f"asked ({crange})", retryable=False)
    return n


def read_mapped(name: str, response: dict[str, Any], reserve: Callable[[int], None], offset: int = 0,
                most: int | None = None) -> bytes | mmap.mmap:
    """The body of a botocore ``get_object`` response, after ``reserve`` of its length; the
    body is closed whatever happens (its connection goes back to the pool only when the
    whole body was read). With ``most``, the answer to a range from ``offset`` (check_range)."""
    body = response["Body"]
    try:
        n = int(response.get("ContentLength", 0)) if most is None else check_range(name, response, offset, most)
        reserve(n)
        if n == 0:
            return b""
        buf = anonymous(n)
        view = memoryview(buf)
        try:
            direct = _socket_response(body, n)
            if direct is not None:
                _fill(name, view, direct.readinto, n)
                body._raw_stream.release_conn()  # read to its end: the connection is reusable
            else:
                _fill(name, view, lambda v: body.readinto(v[:PIECE]), n)
                if body.readinto(bytearray(1)):  # the end, where botocore checks a checksum it was sent
                    raise BackendError(f"{name}: the response is longer than its {n} bytes")
        except (OSError, http.client.HTTPException) as exc:
            raise BackendError(f"{name}: connection lost while reading the response: {exc!r}") from exc
        finally:
            view.release()
        return buf
    finally:
        body.close()


def read_answer(name: str, response: dict[str, Any], offset: int, length: int | None, *, ranged: bool) -> bytes:
    """The body of a botocore ``get_object`` response (S3Backend.get), closed after. The
    answer to a range is checked first (check_range) and read to one byte past the most
    asked for at most: a longer body is refused, never read whole. An object read whole (or
    from ``offset`` to its end) is bounded by its kind (limits.py): a Content-Length over
    that is refused before the body is read, and a body longer than that is cut there."""
    body = response["Body"]
    try:
        most = -offset if offset < 0 else length
        if not ranged or most is None:  # whole, or from offset to the end
            n, limit = int(response.get("ContentLength", 0) or 0), whole_limit(name)
            check_size(name, n, limit)
            if ranged:
                check_range(name, response, offset, n)
            return read_bounded(body.read, name, limit, n)
        check_range(name, response, offset, most)
        data = body.read(most + 1)
        if len(data) > most:
            raise BackendError(f"{name}: the S3 server answered more than the {most} bytes asked", retryable=False)
        return bytes(data)
    finally:
        body.close()


def anonymous(n: int) -> mmap.mmap:
    """``n`` bytes of private anonymous memory (zero pages until written)."""
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _fill(name: str, view: memoryview, readinto: Callable[[memoryview], int | None], n: int) -> None:
    got = 0
    while got < n:
        k = readinto(view[got:])
        if not k:
            raise BackendError(f"{name}: the response ended after {got} of {n} bytes")
        got += k


def _socket_response(body: Any, n: int) -> http.client.HTTPResponse | None:
    """The ``http.client`` response under a plain botocore body of ``n`` bytes still unread,
    or None when the body is anything else (then it is read through its own ``readinto``)."""
    try:
        from botocore.response import StreamingBody
    except ImportError:  # pragma: no cover - the s3 backend needs botocore
        return None
    if type(body) is not StreamingBody:  # a StreamingChecksumBody checks what it reads
        return None
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (not isinstance(fp, http.client.HTTPResponse) or fp.chunked or fp.length != n
            or getattr(raw, "decode_content", True) or not callable(getattr(raw, "release_conn", None))
            or getattr(raw, "_fp_bytes_read", 1) != 0):
        return None
    return fp
