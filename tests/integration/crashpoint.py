"""Run the deltavault CLI and SIGKILL it at an exact backend operation.

The CLI's backend is wrapped in deltavault.testing.faulty.FaultyBackend with one crash
fault: DV_KILL_AT=N kills the process at its Nth put or delete of repository data (locks
are not counted); DV_KILL_PHASE says where: ``before`` it, ``mid`` (half of a put's data
left under a temporary name, never renamed) or ``after`` it. DV_COUNT_FILE receives the
number of such operations of a run that was not killed. The kill is a real SIGKILL of this
process, not a simulated failure.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any

import deltavault.cli.common as common
from deltavault.backends.base import Backend
from deltavault.testing.faulty import Fault, FaultyBackend

KILL_AT = int(os.environ.get("DV_KILL_AT", "0"))
PHASE = os.environ.get("DV_KILL_PHASE", "before")
COUNT_FILE = os.environ.get("DV_COUNT_FILE")
crash = Fault(ops=("put", "delete"), skip="locks/", nth=KILL_AT or -1, action="crash", when=PHASE)
_open_backend = common.open_backend


def open_backend(url: str, **kw: Any) -> Backend:
    """The CLI's backend with the crash armed below the retry layer, at the store itself."""
    b = _open_backend(url, **kw)
    inner = getattr(b, "inner", None)
    if inner is None:
        return FaultyBackend(b, [crash])
    b.inner = FaultyBackend(inner, [crash])  # type: ignore[attr-defined]
    return b


common.open_backend = open_backend
if COUNT_FILE:
    atexit.register(lambda: Path(COUNT_FILE).write_text(str(crash.seen)))

if __name__ == "__main__":
    from deltavault.cli.main import main

    rc = main(sys.argv[1:])
    sys.exit(rc)
