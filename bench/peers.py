"""The peers' settings, one place for every benchmark in bench/ (issue #18, fair settings).

Equal in kind to deltavault's defaults (AES-256-GCM, zstd ``auto``) and to
``../shared/bench/anchors.sh``, which bench/files.py and bench/volume.py run for their peer
rows: every tool encrypts and compresses with zstd.
- borg 1.2: ``init -e repokey-blake2`` (AES-256-CTR + BLAKE2b MAC), ``create --compression
  zstd,3``.
- restic 0.14: repository version 2 (encrypted: AES-256-CTR + Poly1305; the default since
  0.14, named here so that it stays so), ``backup --compression auto`` (zstd).
A borg run needs ``BORG_PASSPHRASE`` in its environment and a restic run
``RESTIC_PASSWORD``.
"""

from __future__ import annotations

BORG_INIT = ["-e", "repokey-blake2"]
BORG_CREATE = ["--compression", "zstd,3"]
RESTIC_INIT = ["--repository-version", "2"]
RESTIC_BACKUP = ["--compression", "auto"]

DESCRIPTION = ("borg 1.2: init -e repokey-blake2, create --compression zstd,3; "
               "restic 0.14: repository version 2 (encrypted), backup --compression auto")
