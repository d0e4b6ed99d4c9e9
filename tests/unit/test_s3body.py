"""Reading S3 response bodies into private mappings (backends/s3body.py), against a small
HTTP server on 127.0.0.1 and the same client stack botocore builds (urllib3 over
http.client, wrapped in botocore's StreamingBody): a plain body goes from the socket into
the mapping and its connection back to the pool; a body cut short is an error and its
connection is not reused; a body botocore checks against a checksum is read through its
own reader, so a wrong checksum still fails."""

from __future__ import annotations

import base64
import ctypes
import os
import socket
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import urllib3
from botocore.exceptions import FlexibleChecksumError
from botocore.httpchecksum import Crc32Checksum, StreamingChecksumBody
from botocore.response import StreamingBody

from deltavault.backends import s3body
from deltavault.errors import BackendError


class _Server:
    """Answers every GET with ``body``; ``cut`` bytes of it at most, then closes."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.cut: int | None = None
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = f.readline()
                    if not line:
                        return
                    head += line
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
                if self.cut is not None:
                    conn.sendall(self.body[:self.cut])
                    return
                conn.sendall(self.body)


@contextmanager
def _served(body: bytes) -> Iterator[tuple[_Server, urllib3.HTTPConnectionPool]]:
    srv = _Server(body)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", srv.port, maxsize=1)
    try:
        yield srv, pool
    finally:
        pool.close()
        srv.sock.close()


def _response(pool: urllib3.HTTPConnectionPool, wrap: Any = None) -> dict[str, Any]:
    """A get_object response as botocore makes it (botocore/httpsession.py: no preloading,
    no decoding)."""
    raw = pool.urlopen("GET", "/pack", preload_content=False, decode_content=False, retries=False)
    n = int(raw.headers["Content-Length"])
    body = wrap(raw, n) if wrap else StreamingBody(raw, n)
    return {"Body": body, "ContentLength": n}


def test_a_body_goes_from_the_socket_into_a_private_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    with _served(data) as (srv, pool):
        # urllib3's own readinto (a temporary per piece, then a copy) is not used
        monkeypatch.setattr(urllib3.HTTPResponse, "readinto", lambda self, b: pytest.fail("copied"))
        reserved: list[int] = []
        for _ in range(3):
            buf = s3body.read_mapped("data/ab/p", _response(pool), reserved.append)
            assert buf[:] == data
        assert reserved == [len(data)] * 3
        assert srv.connections == 1  # each connection went back to the pool, whole
    assert _permissions(buf) == "rw-p"  # private: shared anonymous memory is shmem, dearer to fault


def test_a_body_cut_short_fails_and_its_connection_is_dropped() -> None:
    data = os.urandom(2 * 1024 * 1024)
    with _served(data) as (srv, pool):
        srv.cut = 1024 * 1024
        with pytest.raises(BackendError, match=r"ended after \d+ of 2097152 bytes") as err:
            s3body.read_mapped("data/ab/p", _response(pool), lambda n: None)
        assert err.value.retryable
        srv.cut = None
        assert s3body.read_mapped("data/ab/p", _response(pool), lambda n: None)[:] == data
        assert srv.connections == 2


def test_a_body_with_a_checksum_is_checked_by_botocore() -> None:
    data = os.urandom(1024 * 1024 + 5)

    def checked(good: bool) -> Any:
        crc = zlib.crc32(data if good else data[1:])
        expected = base64.b64encode(crc.to_bytes(4, "big")).decode()
        return lambda raw, n: StreamingChecksumBody(raw, n, Crc32Checksum(), expected)

    with _served(data) as (_srv, pool):
        assert s3body.read_mapped("data/ab/p", _response(pool, checked(True)), lambda n: None)[:] == data
        with pytest.raises(FlexibleChecksumError):
            s3body.read_mapped("data/ab/p", _response(pool, checked(False)), lambda n: None)


def test_an_empty_body() -> None:
    with _served(b"") as (_srv, pool):
        reserved: list[int] = []
        assert s3body.read_mapped("data/ab/p", _response(pool), reserved.append) == b""
        assert reserved == [0]


def _permissions(buf: Any) -> str:
    """The permissions column of /proc/self/maps for the mapping holding ``buf``."""
    c = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(c)
    del c
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.split()[1]
    raise AssertionError("mapping not found")
