"""check --read-data-subset on a local and an sftp repository: slices cover every pack
once, shares and sizes read about that much, damage is found by the slice that holds it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tests.conftest import Cli, init_small_packs
from tests.integration.dayone.conftest import needs_sshd
from tests.sshd import Server


def _repo(tmp_path: Path, cli: Cli) -> int:
    init_small_packs(cli.repo, cli.password_file)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(700_000))
    assert cli("backup", str(src)).returncode == 0
    return len([p for p in (cli.repo / "data").rglob("*") if p.is_file()])


def _subsets(cli: Cli, packs: int) -> None:
    read = [cli("--json", "check", "--read-data-subset", f"{n}/3").last("check_summary") for n in (1, 2, 3)]
    assert sum(r["packs_read"] for r in read) == packs and all(r["errors"] == 0 for r in read)
    half = cli("--json", "check", "--read-data-subset", "50%").last("check_summary")
    assert half["packs_read"] == math.ceil(packs / 2)
    some = cli("--json", "check", "--read-data-subset", "1M").last("check_summary")
    assert 1 <= some["packs_read"] < packs and some["bytes_read"] >= 1024 * 1024 - 2**17
    text = cli("check", "--read-data-subset", "1/1")
    assert text.returncode == 0 and f"in {packs} pack(s)" in text.stdout


def test_subsets_of_a_local_repository(tmp_path: Path, cli: Cli) -> None:
    packs = _repo(tmp_path, cli)
    assert packs >= 5
    _subsets(cli, packs)
    # damage in one pack: exactly the slice holding it finds it
    # a pack of file data only (damage to trees is found by the structure check, every time)
    data_only = sorted(p["id"] for i in os.listdir(cli.repo / "index")
                       for p in json.loads(cli("cat", "index", i).stdout)["packs"]
                       if all(b["type"] == 0 for b in p["blobs"]))
    victim = cli.repo / "data" / data_only[0][:2] / data_only[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    rcs = [cli("check", "--read-data-subset", f"{n}/4").returncode for n in (1, 2, 3, 4)]
    assert sorted(rcs) == [0, 0, 0, 13]
    n = rcs.index(13) + 1
    assert int(victim.name[:2], 16) % 4 == n - 1


def test_bad_subsets_are_usage_errors(tmp_path: Path, cli: Cli) -> None:
    _repo(tmp_path, cli)
    for bad in ("0/3", "4/3", "x/3", "0%", "150%", "lots", "-5"):
        r = cli("check", "--read-data-subset", bad)
        assert r.returncode == 2 and "is not a subset" in r.stderr, (bad, r.stderr)



@needs_sshd
def test_subsets_of_an_sftp_repository(tmp_path: Path, cli: Cli, server: Server) -> None:
    packs = _repo(tmp_path, cli)  # made locally, then read over sftp
    cli.env.update(DELTAVAULT_REPOSITORY=server.url(cli.repo), DELTAVAULT_SSH_CONFIG=str(server.ssh_config))
    _subsets(cli, packs)
