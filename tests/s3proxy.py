"""An HTTP/1.1 proxy on 127.0.0.1 in front of the test S3 server: it counts requests and
bytes each way (the same for any client, so deltavault and restic are measured alike), and
misbehaves on demand, as a real network and a real store do:

- ``drop``: cut the connection (client and server side) half way through the body of the
  next uploads of at least ``min_body`` bytes;
- ``status``: answer the next requests itself with 503 SlowDown (or another status);
- ``delay``: hold each response this long (a slow or stalled server);
- ``unsupported_header``: answer 501 to requests with that header (a store without, say,
  conditional writes);
- ``request``: rewrite each request's head before it goes upstream (drop a Range header);
- ``rewrite``: see each whole upstream answer and send another (a lying or hostile store:
  endless listings, foreign keys, 200 with an error body, a body that stalls, a body of
  gigabytes sent piece by piece).

Requests are read one at a time per connection (no client here pipelines). ``Expect:
100-continue`` is answered by the proxy, and the header (never signed by SigV4) is not
forwarded.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Faults:
    drop: int = 0  # uploads to cut half way
    min_body: int = 1
    status: int = 0  # requests to answer with status_code
    status_code: int = 503
    delay: float = 0.0  # seconds before each response
    methods: tuple[str, ...] = ()  # only these methods (empty: any) for drop and status
    unsupported_header: str = ""  # answer 501 NotImplemented to requests carrying it (lower case)
    request: Callable[[str, str, bytes], bytes] | None = None  # (method, target, head) -> head sent upstream
    rewrite: Callable[[Exchange], Reply | None] | None = None  # None: the upstream answer as it is


@dataclass
class Exchange:
    """One request and the store's whole answer to it, for ``Faults.rewrite``."""

    method: str
    target: str
    status: int
    headers: dict[str, str]  # the answer's, lower case names
    body: bytes


@dataclass
class Reply:
    """What the proxy sends instead: ``data`` (status line, headers, body) as it is; with
    ``stall``, the connection is then held open and silent until the proxy closes."""

    data: bytes
    stall: bool = False
    more: Iterable[bytes] = ()  # sent after data, piece by piece (a body too large to hold)

    @staticmethod
    def of(status: int, body: bytes, headers: dict[str, str] | None = None, length: int | None = None) -> Reply:
        h = {"Content-Type": "application/xml", "Content-Length": str(len(body) if length is None else length),
             **(headers or {})}
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        return Reply(head.encode() + body)


@dataclass
class Stats:
    requests: int = 0
    sent: int = 0  # client -> server bytes (requests)
    received: int = 0  # server -> client bytes (responses)
    by_method: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    refused: int = 0
    by_key: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, path without query)

    def copy(self) -> Stats:
        return Stats(self.requests, self.sent, self.received, Counter(self.by_method), self.dropped, self.refused,
                     Counter(self.by_key))

    def since(self, before: Stats) -> Stats:
        return Stats(self.requests - before.requests, self.sent - before.sent, self.received - before.received,
                     self.by_method - before.by_method, self.dropped - before.dropped, self.refused - before.refused,
                     self.by_key - before.by_key)


class _Conn:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        i = self.buf.index(b"\r\n\r\n") + 4
        h, self.buf = self.buf[:i], self.buf[i:]
        return h

    def exactly(self, n: int) -> Iterator[bytes]:
        while n > 0:
            if not self.buf and not self._fill():
                raise ConnectionError("closed mid-body")
            piece, self.buf = self.buf[:n], self.buf[n:]
            n -= len(piece)
            yield piece

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed mid-chunk")
        i = self.buf.index(b"\r\n") + 2
        ln, self.buf = self.buf[:i], self.buf[i:]
        return ln

    def chunked(self) -> Iterator[bytes]:
        """The raw bytes of a chunked body, trailers included."""
        while True:
            size_line = self.line()
            yield size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:
                    t = self.line()
                    yield t
                    if t == b"\r\n":
                        return
            yield from self.exactly(size + 2)

    def rest(self) -> Iterator[bytes]:
        if self.buf:
            yield self.buf
            self.buf = b""
        while self._fill():
            yield self.buf
            self.buf = b""


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    out = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return lines[0], out


def _body(conn: _Conn, h: dict[str, str], *, response_to: str = "", status: int = 200) -> Iterator[bytes]:
    if response_to == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return iter(())
    if "chunked" in h.get("transfer-encoding", "").lower():
        return conn.chunked()
    if "content-length" in h:
        return conn.exactly(int(h["content-length"]))
    if response_to:
        return conn.rest()  # a response without length ends with the connection
    return iter(())


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults = Faults()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = int(self._srv.getsockname()[1])
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3:{self.endpoint}/{bucket}" + (f"/{prefix}" if prefix else "")

    def snapshot(self) -> Stats:
        with self._lock:
            return self.stats.copy()

    def close(self) -> None:
        self._stop.set()
        try:
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._srv.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take(self, kind: str, method: str, body_len: int) -> bool:
        with self._lock:
            f = self.faults
            if f.methods and method not in f.methods:
                return False
            if kind == "drop" and f.drop > 0 and body_len >= f.min_body:
                f.drop -= 1
                self.stats.dropped += 1
                return True
            if kind == "status" and f.status > 0:
                f.status -= 1
                self.stats.refused += 1
                return True
        return False

    def _count(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.stats.sent += sent
            self.stats.received += received

    def _serve(self, client: socket.socket) -> None:
        up: socket.socket | None = None
        with self._lock:
            self._socks.add(client)
        try:
            c = _Conn(client)
            u: _Conn | None = None
            while True:
                head = c.head()
                if head is None:
                    return
                first, h = _headers(head)
                method, _, target = first.partition(" ")
                with self._lock:
                    self.stats.requests += 1
                    self.stats.by_method[method] += 1
                    self.stats.by_key[(method, target.split(" ", 1)[0].split("?", 1)[0])] += 1
                if "100-continue" in h.get("expect", "").lower():
                    head = b"\r\n".join(ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"expect:"))
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._count(sent=len(head))
                body_len = int(h.get("content-length", "0") or 0) if "chunked" not in h.get(
                    "transfer-encoding", "") else 1 << 40
                refuse = bool(self.faults.unsupported_header) and self.faults.unsupported_header in h
                if refuse or self._take("status", method, body_len):
                    for piece in _body(c, h):
                        self._count(sent=len(piece))
                    msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    code = 501 if refuse else self.faults.status_code
                    if refuse:
                        msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                               b"<Message>A header you provided implies functionality that is not "
                               b"implemented.</Message></Error>")
                    reply = (f"HTTP/1.1 {code} {'Slow Down' if code == 503 else 'Error'}\r\n"
                             f"Content-Type: application/xml\r\nContent-Length: {len(msg)}\r\n\r\n").encode() + msg
                    client.sendall(reply)
                    self._count(received=len(reply))
                    continue
                if up is None:
                    up = socket.create_connection(self.upstream)
                    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with self._lock:
                        self._socks.add(up)
                    u = _Conn(up)
                assert u is not None
                if self.faults.request is not None:
                    head = self.faults.request(method, target, head)
                up.sendall(head)
                drop = self._take("drop", method, body_len)
                forwarded = 0
                for piece in _body(c, h):
                    if drop and forwarded + len(piece) >= body_len // 2:
                        cut = piece[: max(0, body_len // 2 - forwarded)]
                        up.sendall(cut)
                        self._count(sent=len(cut))
                        time.sleep(0.05)
                        return  # both sides closed below: the upload is cut half way
                    up.sendall(piece)
                    forwarded += len(piece)
                    self._count(sent=len(piece))
                rhead = u.head()
                while rhead is not None and rhead.startswith(b"HTTP/1.1 100"):
                    rhead = u.head()
                if rhead is None:
                    return
                status_line, rh = _headers(rhead)
                status = int(status_line.split(" ")[1])
                if self.faults.delay:
                    time.sleep(self.faults.delay)
                if self.faults.rewrite is not None:
                    body = b"".join(_body(u, rh, response_to=method, status=status))
                    reply = self.faults.rewrite(Exchange(method, target, status, rh, body))
                    if reply is None:
                        reply = Reply(rhead + body)
                    client.sendall(reply.data)
                    self._count(received=len(reply.data))
                    for piece in reply.more:
                        client.sendall(piece)
                        self._count(received=len(piece))
                    if reply.stall:
                        self._stop.wait()
                        return
                    continue
                client.sendall(rhead)
                self._count(received=len(rhead))
                for piece in _body(u, rh, response_to=method, status=status):
                    client.sendall(piece)
                    self._count(received=len(piece))
                if rh.get("connection", "").lower() == "close" or h.get("connection", "").lower() == "close":
                    return
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            for s in (client, up):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()
                    with self._lock:
                        self._socks.discard(s)


@contextmanager
def proxy(upstream_port: int) -> Iterator[Proxy]:
    p = Proxy(upstream_port)
    try:
        yield p
    finally:
        p.close()
