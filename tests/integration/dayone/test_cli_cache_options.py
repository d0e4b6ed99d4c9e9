"""init honours the cache options as every other command does: --no-cache makes no cache
folder, --cache-dir puts it there and nowhere else (init made one in the default place)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cli


def test_init_honours_no_cache_and_cache_dir(cli: Cli, tmp_path: Path) -> None:
    default = tmp_path / "clicache"  # DELTAVAULT_CACHE_DIR of the fixture
    home = tmp_path / "home"
    env = {"DELTAVAULT_CACHE_DIR": "", "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    r = cli("--no-cache", "init", env=env)
    assert r.returncode == 0, r.stderr
    assert not home.exists() and not default.exists()
    other = tmp_path / "elsewhere"
    r = cli("--cache-dir", str(other), "-r", str(tmp_path / "repo2"), "init", env=env)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in other.iterdir()] and not home.exists() and not default.exists()
