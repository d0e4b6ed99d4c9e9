"""Run the deltavault CLI and SIGKILL it at an exact backend operation.

DV_KILL_AT=N kills the process at its Nth put or delete on the local backend;
DV_KILL_PHASE says where: ``before`` it, ``mid`` (a put's temp file half written, never
renamed) or ``after`` it. DV_COUNT_FILE receives the number of operations of a run that
was not killed. The kill is a real SIGKILL of this process, not a simulated failure.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from pathlib import Path

from deltavault.backends.local import LocalBackend

KILL_AT = int(os.environ.get("DV_KILL_AT", "0"))
PHASE = os.environ.get("DV_KILL_PHASE", "before")
COUNT_FILE = os.environ.get("DV_COUNT_FILE")
_ops = 0


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _tick(kind: str, backend: LocalBackend, name: str, data: bytes | None) -> bool:
    """True when this operation is the one to die at (after it, for phase 'after')."""
    global _ops
    if name.startswith("locks/"):
        return False  # locks are not repository data
    _ops += 1
    if _ops != KILL_AT:
        return False
    if PHASE == "before":
        _die()
    if PHASE == "mid" and kind == "put" and data is not None:
        path = backend._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-crash"
        tmp.write_bytes(data[: len(data) // 2])
        _die()
    return True


_put, _delete = LocalBackend.put, LocalBackend.delete


def put(self: LocalBackend, name: str, data: bytes) -> None:
    last = _tick("put", self, name, data)
    _put(self, name, data)
    if last:
        _die()


def delete(self: LocalBackend, name: str) -> None:
    last = _tick("delete", self, name, None)
    _delete(self, name)
    if last:
        _die()


LocalBackend.put = put  # type: ignore[method-assign]
LocalBackend.delete = delete  # type: ignore[method-assign]
if COUNT_FILE:
    atexit.register(lambda: Path(COUNT_FILE).write_text(str(_ops)))

if __name__ == "__main__":
    from deltavault.cli.main import main

    rc = main(sys.argv[1:])
    sys.exit(rc)
