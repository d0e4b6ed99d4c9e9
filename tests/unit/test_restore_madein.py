"""When a restored file is created with its final mode (restore/target.py MadeIn.exact):
only where the umask keeps that mode whole, no default ACL turns it into a mask, chown will
not clear set-id bits, and the file stays readable and writable for us until it is done
(NTFS streams are written by name after the content)."""

from __future__ import annotations

import pytest

from deltavault.restore.target import MadeIn


@pytest.mark.parametrize(("final", "umask", "acl", "exact"), [
    (0o644, 0o022, False, True),
    (0o600, 0o077, False, True),
    (0o755, 0o022, False, True),
    (0o664, 0o022, False, False),  # the umask clears g+w: chmodded
    (0o444, 0o022, False, False),  # not writable for us until done
    (0o400, 0o022, False, False),
    (0o4755, 0o022, False, False),  # set-id: after the owner
    (0o1644, 0o022, False, False),
    (0o644, 0o022, True, False),  # a default ACL makes the mode its mask
    (0o644, None, False, False),  # umask not known
])
def test_a_file_is_created_with_its_final_mode_only_where_that_is_exact(
        final: int, umask: int | None, acl: bool, exact: bool) -> None:
    assert MadeIn((0, 0), acl, umask).exact(final) is exact
