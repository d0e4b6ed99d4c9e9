"""copy --from-repo on real repositories: local to local, local to sftp and back;
deduplicated against the target, incremental by the map, and bad input."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import Cli
from tests.integration.dayone.conftest import needs_sshd
from tests.seaweed import Seaweed
from tests.sshd import Server
from tests.treeutil import manifest


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "small.txt").write_text("small\n")
    (src / "big.bin").write_bytes(os.urandom(4_000_000))
    (src / "sub" / "other.bin").write_bytes(os.urandom(500_000))
    (src / "link").symlink_to("small.txt")
    return src


def _target(cli: Cli, tmp_path: Path, location: str) -> dict[str, str]:
    pw = tmp_path / "target-password"
    pw.write_text("target password\n")
    return {"DELTAVAULT_REPOSITORY": location, "DELTAVAULT_PASSWORD_FILE": str(pw),
            "DELTAVAULT_FROM_REPOSITORY": str(cli.repo), "DELTAVAULT_FROM_PASSWORD_FILE": str(cli.password_file)}


def _copy_cycle(tmp_path: Path, cli: Cli, target: dict[str, str]) -> None:
    src = _src(tmp_path)
    assert cli("init").returncode == 0
    assert cli("backup", str(src), "--tag", "one").returncode == 0
    assert cli("init", env=target).returncode == 0
    r = cli("--json", "copy", env=target)
    assert r.returncode == 0, r.stdout + r.stderr
    first = r.last("copy_summary")
    assert (first["copied"], first["skipped"]) == (1, 0) and first["bytes_read"] >= 4_500_000
    copies = cli("--json", "snapshots", env=target).json
    orig = cli("--json", "snapshots").json
    assert [c["tags"] for c in copies] == [["one"]] and copies[0]["paths"] == orig[0]["paths"]
    assert copies[0]["time"] == orig[0]["time"]
    # again: nothing to copy
    again = cli("--json", "copy", env=target).last("copy_summary")
    assert (again["copied"], again["skipped"], again["blobs_read"]) == (0, 1, 0)
    # a new snapshot: only what changed is read from the source (the map knows the rest)
    (src / "small.txt").write_text("changed\n")
    assert cli("backup", str(src)).returncode == 0
    inc = cli("--json", "copy", env=target).last("copy_summary")
    assert (inc["copied"], inc["skipped"]) == (1, 1)
    assert inc["bytes_read"] < 10_000, inc  # not the big files again
    copies = cli("--json", "snapshots", env=target).json
    assert copies[1]["parent"] == copies[0]["id"]  # the copy of the parent
    out = tmp_path / "restored"
    r = cli("restore", "latest", "--target", str(out), "--verify", env=target)
    assert r.returncode == 0, r.stderr
    assert manifest(out / "data") == manifest(src)
    assert cli("check", "--read-data", env=target).returncode == 0


def test_copy_between_local_repositories(tmp_path: Path, cli: Cli) -> None:
    _copy_cycle(tmp_path, cli, _target(cli, tmp_path, str(tmp_path / "offsite")))


def test_copy_without_the_map_reads_again_but_stores_nothing_twice(tmp_path: Path, cli: Cli) -> None:
    target = _target(cli, tmp_path, str(tmp_path / "offsite"))
    src = _src(tmp_path)
    assert cli("init").returncode == 0 and cli("init", env=target).returncode == 0
    assert cli("backup", str(src)).returncode == 0
    assert cli("copy", env=target).returncode == 0
    (src / "new.txt").write_text("new\n")
    assert cli("backup", str(src)).returncode == 0
    r = cli("--json", "--no-cache", "copy", env=target)  # another machine: no map
    s = r.last("copy_summary")
    assert s["copied"] == 1 and s["bytes_read"] >= 4_500_000  # read again, to learn the target's ids
    assert s["blobs_new"] <= 3  # new.txt, and the trees above it


def test_copy_selects_by_id_and_filters_and_refuses_bad_input(tmp_path: Path, cli: Cli) -> None:
    target = _target(cli, tmp_path, str(tmp_path / "offsite"))
    src = _src(tmp_path)
    assert cli("init").returncode == 0 and cli("init", env=target).returncode == 0
    assert cli("backup", str(src), "--tag", "keep").returncode == 0
    assert cli("backup", str(src / "sub")).returncode == 0
    assert cli("--json", "copy", "--tag", "keep", env=target).last("copy_summary")["copied"] == 1
    latest = cli("--json", "snapshots").json[-1]["id"]
    assert cli("--json", "copy", latest[:8], env=target).last("copy_summary")["copied"] == 1
    r = cli("copy", "deadbeef", env=target)
    assert r.returncode == 2 and "no snapshot matches 'deadbeef'" in r.stderr
    r = cli("copy", env={**target, "DELTAVAULT_FROM_PASSWORD_FILE": str(tmp_path / "target-password")})
    assert r.returncode == 12 and "(the source repository, --from-repo)" in r.stderr
    r = cli("copy", env={**target, "DELTAVAULT_FROM_REPOSITORY": str(tmp_path / "nowhere")})
    assert r.returncode == 10
    r = cli("copy", env={**target, "DELTAVAULT_FROM_REPOSITORY": ""})
    assert r.returncode == 2 and "--from-repo" in r.stderr
    same = {**target, "DELTAVAULT_REPOSITORY": str(cli.repo), "DELTAVAULT_PASSWORD_FILE": str(cli.password_file)}
    r = cli("copy", env=same)
    assert r.returncode == 2 and "the same repository" in r.stderr


def test_copy_a_volume_snapshot_and_restore_it_verified(tmp_path: Path, cli: Cli) -> None:
    """A volume's page digests are keyed per repository: the copy computes them again under
    the target's key, so restore --volume --verify in the target checks every page."""
    target = _target(cli, tmp_path, str(tmp_path / "offsite"))
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(5000))  # a short last page
    assert cli("init").returncode == 0 and cli("init", env=target).returncode == 0
    assert cli("backup", "--volume", str(img), "--block-size", "256K").returncode == 0
    with open(img, "r+b") as f:
        f.seek(5000)
        f.write(b"changed")
    assert cli("backup", "--volume", str(img), "--block-size", "256K").returncode == 0
    r = cli("--json", "copy", env=target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.last("copy_summary")["copied"] == 2
    for n, snap in enumerate(cli("--json", "snapshots", env=target).json):
        out = tmp_path / f"out{n}.img"
        rr = cli("--json", "restore", "--volume", snap["id"], str(out), "--verify", env=target)
        assert rr.returncode == 0, rr.stdout + rr.stderr
        assert rr.last("summary")["pages_mismatched"] == 0
    assert (tmp_path / "out1.img").read_bytes() == img.read_bytes()
    assert cli("check", "--read-data", env=target).returncode == 0
    # the target's own next volume backup of that disk works from the copy (it reads it whole)
    assert cli("backup", "--volume", str(img), "--block-size", "256K", env=target).returncode == 0



@needs_sshd
def test_copy_from_local_to_sftp(tmp_path: Path, cli: Cli, server: Server) -> None:
    cli.env["DELTAVAULT_SSH_CONFIG"] = str(server.ssh_config)
    _copy_cycle(tmp_path, cli, _target(cli, tmp_path, server.url(tmp_path / "remote" / "offsite")))


@needs_sshd
def test_copy_from_sftp_to_local(tmp_path: Path, cli: Cli, server: Server) -> None:
    cli.env.update(DELTAVAULT_SSH_CONFIG=str(server.ssh_config),
                   DELTAVAULT_REPOSITORY=server.url(tmp_path / "remote" / "repo"))
    target = _target(cli, tmp_path, str(tmp_path / "local-copy"))
    target["DELTAVAULT_FROM_REPOSITORY"] = cli.env["DELTAVAULT_REPOSITORY"]
    _copy_cycle(tmp_path, cli, target)


def test_copy_from_local_to_s3_and_back(tmp_path: Path, cli: Cli, seaweed: Seaweed) -> None:
    """The 3-2-1 copy to object storage (a real S3 server), then from it to a local repository."""
    cli.env.update(seaweed.env())
    bucket = seaweed.new_bucket()
    _copy_cycle(tmp_path, cli, _target(cli, tmp_path, seaweed.url(bucket, "offsite")))
    back = tmp_path / "back"
    back.mkdir()
    target = _target(cli, back, str(back / "local-copy"))
    target["DELTAVAULT_FROM_REPOSITORY"] = seaweed.url(bucket, "offsite")
    target["DELTAVAULT_FROM_PASSWORD_FILE"] = str(tmp_path / "target-password")
    assert cli("init", env=target).returncode == 0
    r = cli("--json", "copy", env=target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.last("copy_summary")["copied"] == 2
    out = back / "restored"
    assert cli("restore", "latest", "--target", str(out), "--verify", env=target).returncode == 0
    assert manifest(out / "data") == manifest(tmp_path / "data")
