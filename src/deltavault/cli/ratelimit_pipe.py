"""The ssh command of a sync with ``--limit-upload``/``--limit-download``: run as
``python -m deltavault.cli.ratelimit_pipe --up N --down N -- ssh ARGS...``, it starts the
real ssh and relays its standard input and output through token buckets
(backends/throttle.py), so a push or a pull is held to the rates without the sync protocol
knowing. ssh's errors pass through, and its exit status is this process's."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading

from deltavault.backends.throttle import TokenBucket

CHUNK = 64 * 1024


def _relay(src: int, dst: int, bucket: TokenBucket | None) -> None:
    try:
        while True:
            data = os.read(src, CHUNK)
            if not data:
                break
            if bucket is not None:
                bucket.take(len(data))
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
    except OSError:
        pass  # the other end went away: ssh's status says why
    finally:
        try:
            os.close(dst)
        except OSError:
            pass


def wrap(rsh: list[str], upload: int | None, download: int | None) -> list[str]:
    """The argv that runs ``rsh`` through this relay."""
    return [sys.executable, "-m", "deltavault.cli.ratelimit_pipe", "--up", str(upload or 0),
            "--down", str(download or 0), "--", *rsh]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deltavault-ratelimit-pipe")
    p.add_argument("--up", type=int, default=0)
    p.add_argument("--down", type=int, default=0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    # the relays own their descriptors (closing one ends that direction), not the file objects
    to_ssh, from_ssh = os.dup(proc.stdin.fileno()), os.dup(proc.stdout.fileno())
    proc.stdin.close()
    proc.stdout.close()
    up = threading.Thread(target=_relay, args=(0, to_ssh, TokenBucket(a.up) if a.up else None), daemon=True)
    up.start()
    _relay(from_ssh, os.dup(1), TokenBucket(a.down) if a.down else None)
    os.close(from_ssh)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
