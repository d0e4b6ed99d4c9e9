"""Loads libnbd's Python binding (Debian package python3-libnbd; not on PyPI).

The binding lives in the system's dist-packages, which a virtualenv does not see. It is
built for the system Python's ABI, so it is used only when that matches ours.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from deltavault.errors import SourceError

DEBIAN_PATH = "/usr/lib/python3/dist-packages"

_nbd: ModuleType | None = None


def load_nbd() -> ModuleType:
    """The ``nbd`` module, or SourceError saying how to install it."""
    global _nbd
    if _nbd is not None:
        return _nbd
    try:
        _nbd = importlib.import_module("nbd")
        return _nbd
    except ImportError:
        pass
    if DEBIAN_PATH not in sys.path:
        # Appended, not prepended: nothing else in that directory may shadow our packages.
        sys.path.append(DEBIAN_PATH)
    try:
        _nbd = importlib.import_module("nbd")
    except ImportError as exc:
        raise SourceError(f"libnbd's Python binding is not available ({exc}); install the Debian "
                          "package python3-libnbd (scripts/install-system-deps.sh)") from None
    return _nbd


def available() -> bool:
    try:
        load_nbd()
    except SourceError:
        return False
    return True
