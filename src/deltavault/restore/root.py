"""The restore target's root: opened following no other user's symlink on its path
(fs/trusted.py: a symlink ``/home/alice/restore -> /etc`` alice made had root's restore
write in /etc, and with --delete delete there), made with its missing parents, and used
only through that one descriptor.

Taken for the run when another user owns it, as sync takes DST's root: ours alone (0700,
no ACLs) before anything is written in it; its owner could otherwise chmod it or give it a
default ACL at any moment of the run, and a root of theirs was what the restore wrote under
(the path to it their symlinks, refused now, or their own directory). Its own metadata is
the user's, not the snapshot's (a snapshot records none for its root: its root tree is a
bare listing of what was backed up), so the root's "final mode" is the one it has: at the
end, and when the run is cut short, it gets back the owner, group, mode and ACLs it had.
For the same reason a root of ours is never more open than it will be, and is left as it
is, even one others may write in (``/tmp``, a 0777 scratch directory): every entry the
restore puts there is made 0700 or 0600 under a temp name and checked to be the one made
(restore/target.py), and ends with the snapshot's own mode; an in-place restore to ``/``
never makes ``/`` 0700.
"""

from __future__ import annotations

import os

from deltavault.fs.takeroot import TakenRoot, give_back, take_root
from deltavault.fs.trusted import open_target_root

_WHAT = "the restore target"


class TargetRoot:
    """The open target root (a context manager: ``fd``); ``release`` gives back what the
    run took of it, and says what could not be."""

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.fd = -1
        self.taken: TakenRoot | None = None

    def __enter__(self) -> TargetRoot:
        self.fd = open_target_root(self.path, _WHAT, create=True)
        try:
            st = os.fstat(self.fd)
            if st.st_uid != os.geteuid():
                self.taken = take_root(self.fd, st, _WHAT, self.path, "restore into a directory of your own "
                                       "(or as root, which takes it for the run)")
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def release(self) -> list[str]:
        """The root's owner, group, mode and ACLs back as they were before the run took it
        (nothing if it was not taken); once."""
        taken, self.taken = self.taken, None
        if taken is None:
            return []
        return give_back(self.fd, taken, acls=True, owner=True, mode=True)

    def __exit__(self, *_exc: object) -> None:
        try:
            self.release()  # a run cut short: the root is not left taken
        finally:
            os.close(self.fd)
