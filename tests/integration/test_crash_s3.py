"""The crash trials of test_crash.py (the real CLI SIGKILLed at random moments and at exact
backend operations during backup, prune and restore) on a repository in SeaweedFS.

After every trial check passes and stored snapshots keep their bytes; at the end every
snapshot is restored and compared, and the leftovers of killed uploads (incomplete
multipart uploads, and the temporary objects the crash hook leaves for a kill "mid" put)
are removed by the backend's housekeeping. DELTAVAULT_S3_CRASH_TRIALS sets the number of
trials (default 40: each trial starts CLI processes against the server).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from deltavault.backends import open_backend
from deltavault.backends.base import TEMP_PREFIX, unwrap
from deltavault.backends.s3 import S3Backend
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, init_small_packs
from tests.integration.test_crash import SEED, Harness, run_trials
from tests.seaweed import Seaweed

TRIALS = int(os.environ.get("DELTAVAULT_S3_CRASH_TRIALS", "40"))
pytestmark = pytest.mark.memory_limit  # as in test_crash.py


class S3Harness(Harness):
    def __init__(self, cli: Cli, tmp: Path, rnd: random.Random, seaweed: Seaweed, bucket: str) -> None:
        super().__init__(cli, tmp, rnd)
        self.sw = seaweed
        self.bucket = bucket
        self.url = cli.env["DELTAVAULT_REPOSITORY"]

    def repo(self) -> Repository:
        return Repository.open(open_backend(self.url), lambda: PASSWORD, use_cache=False)

    def _all(self) -> list[dict]:
        c = self.sw.client()
        out: list[dict] = []
        args = {"Bucket": self.bucket, "Prefix": "repo/"}
        while True:
            page = c.list_objects_v2(**args)
            out += page.get("Contents", [])
            if not page.get("IsTruncated"):
                return out
            args["ContinuationToken"] = page["NextContinuationToken"]

    def listing(self) -> dict[str, tuple[int, int]]:
        """Stored objects: size, and the ETag (a changed object gets another) as a number."""
        out = {}
        for o in self._all():
            rel = o["Key"].removeprefix("repo/")
            if not rel.startswith("locks/") and not rel.rpartition("/")[2].startswith(TEMP_PREFIX):
                out[rel] = (int(o["Size"]), int(o["ETag"].strip('"').split("-")[0][:15], 16))
        return out

    def clean_temp_files(self) -> None:
        c = self.sw.client()
        uploads = c.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        temps = [o for o in self._all() if o["Key"].rpartition("/")[2].startswith(TEMP_PREFIX)]
        self.stats["temp_files_left_by_kills"] = len(temps)
        self.stats["uploads_left_by_kills"] = len(uploads)
        # prune removes them once an hour old (TEMP_GRACE); these are minutes old, so the
        # same housekeeping is called with no grace.
        b = unwrap(open_backend(self.url))
        assert isinstance(b, S3Backend)
        removed, _size = b.remove_temp_files(0)
        assert removed == len(uploads) + len(temps)
        assert c.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []) == []
        assert not [o for o in self._all() if TEMP_PREFIX in o["Key"]]
        r = self.cli("prune", "--json")
        assert r.returncode == 0, r.stderr


@pytest.mark.timeout(1800)
@pytest.mark.usefixtures("s3env")
def test_sigkill_at_random_points_on_s3(cli: Cli, seaweed: Seaweed, tmp_path: Path) -> None:
    rnd = random.Random(SEED)
    bucket = seaweed.new_bucket()
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=seaweed.url(bucket, "repo"))
    print(f"S3 crash test seed {SEED} trials {TRIALS}")
    init_small_packs(cli.env["DELTAVAULT_REPOSITORY"], cli.password_file)
    h = S3Harness(cli, tmp_path, rnd, seaweed, bucket)
    run_trials(h, rnd, TRIALS)
    print({k: h.stats.get(k) for k in ("killed", "killed_at_op", "temp_files_left_by_kills", "uploads_left_by_kills")})
