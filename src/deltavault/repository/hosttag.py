"""Host tags: which snapshots of the repository this host wrote.

Every host that backs up into a repository holds its key, so any of them can write a
snapshot claiming another's hostname and source; the repository's authentication cannot
tell them apart. A backup with no local catalog takes its parent from the repository and
keeps every file (every volume block) whose metadata match the parent's, unread: a parent
planted by another host put that host's content into this host's next snapshot. So each
snapshot a backup writes carries ``host_tag``, a keyed BLAKE3 under a key only this host
can derive (from its secret, fs/hostsecret.py, and the repository's id) over the fields that
say what it is: kind, source id, hostname, start time, root tree or volume manifest. A
parent found in the repository is used only if its tag verifies: one keyed hash, no
download. docs/design.md ("Host tags") and docs/security.md say more.
"""

from __future__ import annotations

import hmac

import blake3
import msgspec

from deltavault.errors import HostSecretError
from deltavault.fs.hostsecret import HostSecret, load_host_secret
from deltavault.model.snapshot import Snapshot
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id

_CONTEXT = b"deltavault host tag v1\0"


class HostTagger:
    def __init__(self, secret: bytes | None, repo_id: str, note: str = "") -> None:
        # None: no secret could be kept; nothing is tagged and no snapshot is this host's
        self._key = None if secret is None else blake3.blake3(_CONTEXT + repo_id.encode(), key=secret).digest()
        self.note = note  # the host secret was made anew, or none is kept, and why

    @classmethod
    def for_repository(cls, repo: Repository, secret: HostSecret | None = None) -> HostTagger:
        """This host's tagger for ``repo`` (the secret loaded, or made, when not given). A
        secret that cannot be kept safely (its directory another user's, a read-only home)
        does not stop the backup: it runs as if this host had written no snapshot (every
        file is read) and tags nothing, and the note says why."""
        if secret is None:
            try:
                secret = load_host_secret()
            except HostSecretError as exc:
                return cls(None, repo.config.id, f"{exc}. This run reads every file (it trusts no snapshot "
                                                 "in the repository as this host's) and its snapshot is not tagged")
        return cls(secret.secret, repo.config.id, secret.note)

    def tag(self, snap: Snapshot) -> bytes | None:
        if self._key is None:
            return None
        kind, source_id, hostname, time_ns, tree, volume = _bound(snap)
        bound = msgspec.msgpack.encode([kind, source_id, hostname, time_ns, tree or b"", volume or b""])
        return blake3.blake3(bound, key=self._key).digest()

    def sign(self, snap: Snapshot) -> Snapshot:
        return msgspec.structs.replace(snap, host_tag=self.tag(snap))

    def wrote(self, snap: Snapshot) -> bool:
        """Whether this host wrote ``snap`` (its tag verifies) as it stands."""
        tag = self.tag(snap)
        return snap.host_tag is not None and tag is not None and hmac.compare_digest(snap.host_tag, tag)


def own_parent(tagger: HostTagger, candidates: list[tuple[str, Snapshot]],
               what: str = "file") -> tuple[tuple[str, Snapshot] | None, str]:
    """The newest of ``candidates`` (oldest first, as listed) that this host wrote, and, when
    newer ones were passed over (or none is left), why: "" when the newest one is used."""
    passed: list[str] = []
    found = None
    for sid, snap in reversed(candidates):
        if tagger.wrote(snap):
            found = (sid, snap)
            break
        passed.append(sid)
    if not passed:
        return found, ""
    newer = f" and {len(passed) - 1} older one{'s' if len(passed) > 2 else ''}" if len(passed) > 1 else ""
    then = (f"the newest this host wrote, {short_id(found[0])}, is the parent" if found is not None
            else f"every {what} is read")
    return found, (f"snapshot {short_id(passed[0])}{newer} of this source not written by this host "
                   f"(no valid host tag): {then}")


def _bound(snap: Snapshot) -> tuple[object, ...]:
    return snap.kind, snap.source_id, snap.hostname, snap.time_ns, snap.tree, snap.volume


def carried_tag(old: Snapshot, new: Snapshot) -> Snapshot:
    """``new``, made from ``old`` by another host or command (tag, rewrite): it keeps the tag
    only while everything the tag binds is unchanged (``tag`` changes tags, which it does not
    bind); otherwise the tag is dropped rather than left to fail, and the edited snapshot is
    no longer a parent this host trusts without a catalog (its next run reads every file)."""
    keep = old.host_tag if _bound(old) == _bound(new) else None
    return new if new.host_tag == keep else msgspec.structs.replace(new, host_tag=keep)
