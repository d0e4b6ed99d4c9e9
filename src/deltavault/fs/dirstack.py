"""The stack of directory fds a walk holds, bounded: deeper than a limit, the fds of the
shallowest directories (but the top one's) are closed, and each is opened again through
".." of its child when the walk climbs back, and must then be the directory it was."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from deltavault.fs.dirfd import Identity, open_parent_checked


class Level(Protocol):
    fd: int  # -1: closed for depth
    ident: Identity


def bound(stack: Sequence[Level], closed_below: int, limit: int) -> int:
    """Close fds from ``stack[closed_below]`` down until at most ``limit`` are open; the new
    ``closed_below`` (stack[1:closed_below] have their fd closed)."""
    while len(stack) - closed_below > limit:
        os.close(stack[closed_below].fd)
        stack[closed_below].fd = -1
        closed_below += 1
    return closed_below


def climb(stack: Sequence[Level], child_fd: int) -> bool:
    """After popping the level whose fd is ``child_fd``: open the new top again if it was
    closed. False when it cannot be (it was moved meanwhile: not the directory it was)."""
    if not stack or stack[-1].fd >= 0:
        return True
    up = open_parent_checked(child_fd, stack[-1].ident)
    if up is None:
        return False
    stack[-1].fd = up
    return True
