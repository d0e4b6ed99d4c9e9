"""The key file kept in the local cache (repository/keyhint.py) so that the next command
derives its key while it reads the store: it must be trusted for nothing. A copy that is
stale, damaged, or another repository's key file opened by the same password (planted by
whoever can write the cache, or left by a repository that stood at this location before)
costs one derivation and opens nothing but this repository, with its own key."""

from __future__ import annotations

from pathlib import Path

from deltavault.repository.keys import MasterKey, make_key_file
from tests.conftest import FAST_SCRYPT, PASSWORD, Cli


def _kept(cli: Cli) -> Path:
    (hint,) = (cli.cache / "key-hints").iterdir()
    return hint


def _own_key(cli: Cli) -> bytes:
    (key,) = (cli.repo / "keys").iterdir()
    return key.read_bytes()


def _restores(cli: Cli, src: Path, out: Path) -> None:
    r = cli("restore", "latest", "--target", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "src" / "f").read_bytes() == (src / "f").read_bytes()


def test_the_key_file_kept_opens_this_repository_and_no_other(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"this repository's file " * 100)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    hint = _kept(cli)
    assert hint.read_bytes() == _own_key(cli)  # the key file that opened it, byte for byte
    assert hint.stat().st_mode & 0o077 == 0
    _restores(cli, src, tmp_path / "out1")

    # Another repository's key file under the same password: it opens, to another key,
    # which must not be taken for this repository's; the copy becomes this one's again.
    hint.write_bytes(make_key_file(MasterKey.generate(), PASSWORD, FAST_SCRYPT))
    _restores(cli, src, tmp_path / "out2")
    assert hint.read_bytes() == _own_key(cli)

    for planted in (b"", b"{not json", _own_key(cli)[:-20]):  # damaged copies: ignored, replaced
        hint.write_bytes(planted)
        _restores(cli, src, tmp_path / f"out-{len(planted)}")
        assert hint.read_bytes() == _own_key(cli)

    # The right copy with the wrong password: the password is wrong, as without a copy.
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    r = cli("snapshots", env={"DELTAVAULT_PASSWORD_FILE": str(wrong)})
    assert r.returncode == 12 and "wrong password" in r.stderr, r.stdout + r.stderr
    assert hint.read_bytes() == _own_key(cli)


def test_no_cache_keeps_no_key_file(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").returncode == 0
    assert cli("--no-cache", "snapshots").returncode == 0
    assert not (cli.cache / "key-hints").exists()
    assert cli("snapshots").returncode == 0
    assert _kept(cli).read_bytes() == _own_key(cli)
