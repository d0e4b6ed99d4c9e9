"""What every snapshot provider offers, and how commands are run (swappable in tests)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from deltavault.errors import SnapshotError


@dataclass(frozen=True)
class SnapshotHandle:
    """A point-in-time, read-only view of the volume holding ``original_path``."""

    kind: str  # btrfs | lvm | vss | none
    mount_path: str  # root of the snapshot, where it can be read
    source_path: str  # original_path as seen inside the snapshot: read from here
    original_path: str
    ident: str = ""  # provider's name for it: subvolume path, LV name, shadow copy ID
    note: str = ""  # something the user should know (e.g. no snapshot was possible)


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, input: str | None = None) -> str: ...


def run_command(argv: Sequence[str], *, input: str | None = None) -> str:
    """Run a tool; its stdout, or SnapshotError quoting its stderr."""
    try:
        p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=300)
    except FileNotFoundError as exc:
        raise SnapshotError(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise SnapshotError(f"{' '.join(argv)} did not finish in 300 s") from exc
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise SnapshotError(f"{' '.join(argv[:3])} failed (exit {p.returncode}): {msg[-1] if msg else 'no message'}")
    return p.stdout


class Snapshotter(Protocol):
    kind: str

    def create(self, path: str) -> SnapshotHandle: ...

    def remove(self, handle: SnapshotHandle) -> None: ...
