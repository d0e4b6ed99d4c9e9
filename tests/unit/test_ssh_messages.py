"""ssh's exit 255 typed from OpenSSH's own messages (sync/ssh.py); whole lines only, since
the far end's stderr comes on the same stream."""

from __future__ import annotations

import pytest

from deltavault.errors import AccessRefused, Unreachable, UsageError
from deltavault.sync.ssh import _not_connected


@pytest.mark.parametrize(("line", "kind", "code"), [
    ("dv@127.0.0.1: Permission denied (publickey,password).", AccessRefused, 19),
    ("Permission denied (publickey).", AccessRefused, 19),  # OpenSSH before user@host was added
    ("Received disconnect from 10.0.0.1 port 22:2: Too many authentication failures", AccessRefused, 19),
    ("ssh: connect to host 127.0.0.1 port 4: Connection refused", Unreachable, 20),
    ("ssh: connect to host 127.0.0.1 port 4: Permission denied", Unreachable, 20),  # local policy, not a login
    ("Host key verification failed.", Unreachable, 20),
    ("Unable to negotiate with 127.0.0.1 port 2222: no matching cipher found. Their offer: aes128-cbc",
     Unreachable, 20),
    ("/root/.ssh/config: line 2: Bad configuration option: bogusoption", UsageError, 2),
    ("Bad owner or permissions on /root/.ssh/config", UsageError, 2),
    # a remote program's own messages are not ssh's
    ("x: Permission denied (os error 13)", None, None),
    ("cat: /root/f: Permission denied", None, None),
])
def test_ssh_messages(line: str, kind: type | None, code: int | None) -> None:
    err = _not_connected("h", f"some banner line\n{line}\n")
    if kind is None:
        assert err is None
    else:
        assert isinstance(err, kind) and err.exit_code == code
        assert ("host key of h" if line.startswith("Host key") else line) in err.message
