"""qemu-img and qemu-nbd as deltavault's children (tracking/volume/qemuproc.py): "in use"
only when qemu says another process holds the image, CPU time bounded, none outliving a
SIGKILLed run, and the socket directories such a run leaves removed by the next."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import deltavault
from deltavault.errors import ExitCode, SourceError
from deltavault.tracking.volume import nbdlib
from deltavault.tracking.volume.qemu import image_map
from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.volume.test_volume_images import MiB, random_image
from tests.integration.volume.test_volume_images_dos import TiB, hostile_vmdk, qemu_processes
from tests.waits import until

pytestmark = [needs_tools("qemu-img", "qemu-nbd", "qemu-io"),
              pytest.mark.skipif(not nbdlib.available(), reason="needs python3-libnbd")]


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``: their command names."""
    found = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == pid:
            found[int(p)] = comm
    return found


def proc_field(pid: int, index: int) -> str:
    """Field ``index`` (from 3, the state) of /proc/PID/stat; "" once the process is reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[index - 3]


def stop_left(img: Path) -> list[str]:
    """qemu processes still running for ``img``, stopped (they are the test's own)."""
    left = qemu_processes(img)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    return left


def test_an_error_naming_a_block_node_is_not_called_in_use(cli: Cli, tmp_path: Path) -> None:
    """qemu names its nodes '#blockNNN': a 1 PiB qcow2 refuses a dirty bitmap with "Can't make
    bitmap 'dv-...' persistent in '#block194': Too much space will be occupied by the bitmap",
    which had been reported as an image in use, as had a damaged image under a "blocks"
    directory. A real lock still is."""
    assert cli("init").returncode == 0
    big = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "1P"], check=True)
    r = cli("--json", "backup", "--volume", str(big))
    assert r.returncode == ExitCode.SOURCE, r.stdout
    error = r.last("error")["message"]
    assert "#block" in error and "Too much space" in error, error
    assert "in use" not in error, error

    where = tmp_path / "blocks"
    where.mkdir()
    vhdx, _ = random_image(tmp_path, "vhdx")
    damaged = where / "damaged.vhdx"
    damaged.write_bytes(vhdx.read_bytes()[:vhdx.stat().st_size // 2])
    r = cli("--json", "backup", "--volume", str(damaged))
    assert r.returncode == ExitCode.SOURCE, r.stdout
    error = r.last("error")["message"]
    assert "(damaged, truncated, or a file it names is missing)" in error and "in use" not in error, error


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_an_image_another_process_holds_is_in_use(cli: Cli, tmp_path: Path, fmt: str) -> None:
    img, _ = random_image(tmp_path, fmt, 8 * MiB)
    assert cli("init").returncode == 0
    holder = subprocess.Popen(["qemu-io", "-f", fmt, str(img)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:  # qemu-io holds the image (write lock) until its stdin closes, as a VM would
        until(lambda: subprocess.run(["qemu-img", "info", str(img)], capture_output=True).returncode != 0,
              "qemu-io holding the image", holder)
        r = cli("--json", "backup", "--volume", str(img))
        assert r.returncode == ExitCode.SOURCE, r.stdout
        error = r.last("error")["message"]
        assert 'Failed to get shared "write" lock' in error and "in use" in error, error
    finally:
        holder.communicate(b"quit\n", timeout=30)
    assert cli("backup", "--volume", str(img)).returncode == 0


def mapping(img: Path, timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    """A process mapping the hostile VMDK ``img`` with ``image_map``, and its qemu-img child."""
    code = ("import sys; from deltavault.tracking.volume.qemu import image_map; "
            f"image_map(sys.argv[1], 'vmdk', 0, {TiB}, timeout={timeout})")
    src = os.path.dirname(os.path.dirname(deltavault.__file__))
    run = subprocess.Popen([sys.executable, "-c", code, str(img)], env={**os.environ, "PYTHONPATH": src})
    found: list[int] = []

    def spawned() -> bool:
        found[:] = [p for p, c in children(run.pid).items() if c == "qemu-img"]
        return bool(found)

    try:
        until(spawned, "the qemu-img child", run)
    except BaseException:
        run.kill()
        run.wait(30)
        raise
    return run, found[0]


def test_a_qemu_img_child_has_its_cpu_time_bounded(tmp_path: Path) -> None:
    """The limit is in the child itself (/proc/PID/limits), and the kernel enforces it when
    deltavault cannot: with the run stopped (SIGSTOP), its deadline never comes, and the
    map of the hostile VMDK (which spins for hours) is killed at 3 s of CPU time."""
    img = hostile_vmdk(tmp_path / "vm.vmdk", 1, 1 << 31, compressed=True)
    run, child = mapping(img, 3)
    try:
        limits = Path(f"/proc/{child}/limits").read_text().splitlines()
        assert [line.split()[3:5] for line in limits if line.startswith("Max cpu time")] == [["3", "3"]], limits
        os.kill(run.pid, signal.SIGSTOP)
        until(lambda: proc_field(child, 3) in ("Z", ""), "qemu-img killed at its CPU bound")
        assert int(proc_field(child, 52)) & 0x7F == signal.SIGKILL  # its exit status: killed
    finally:
        run.kill()  # SIGKILL ends a stopped process too
        run.wait(30)
        left = stop_left(img)
    assert left == []


def test_a_qemu_img_dies_with_a_sigkilled_run(tmp_path: Path) -> None:
    """The map of the hostile VMDK had gone on for hours, orphaned, after its run was killed."""
    img = hostile_vmdk(tmp_path / "vm.vmdk", 1, 1 << 31, compressed=True)
    run, child = mapping(img, 60)
    run.kill()
    run.wait(30)
    try:
        until(lambda: proc_field(child, 3) in ("Z", ""), "qemu-img gone with its run")
    finally:
        left = stop_left(img)
    assert left == []


def test_a_killed_map_reports_its_cpu_bound(tmp_path: Path) -> None:
    img = hostile_vmdk(tmp_path / "vm.vmdk", 1, 1 << 31, compressed=True)

    def kill_it() -> None:  # as the kernel would at the bound
        until(lambda: bool(qemu_processes(img)), "the qemu-img child")
        for pid in qemu_processes(img):
            os.kill(int(pid), signal.SIGKILL)

    killer = threading.Thread(target=kill_it)
    killer.start()
    try:
        with pytest.raises(SourceError, match=r"qemu-img map .*: killed \(signal 9\); it may use 60 s of CPU time"):
            image_map(str(img), "vmdk", 0, TiB, timeout=60)
    finally:
        killer.join()


def test_a_sigkilled_backup_leaves_no_qemu_and_the_next_run_clears_its_socket_dir(cli: Cli, tmp_path: Path) -> None:
    """deltavault SIGKILLed while qemu-nbd serves the image: qemu-nbd dies with it (it had
    gone on serving, and held the image), and the next run removes the socket directory
    the killed one could not."""
    img, _ = random_image(tmp_path, "qcow2", 16 * MiB)
    assert cli("init").returncode == 0
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**cli.env, "TMPDIR": str(tmpdir)}
    # 64 KiB/s to the repository: the run is still sending when it is killed
    run = subprocess.Popen([sys.executable, "-m", "deltavault", *cli.options, "--limit-upload", "64",
                            "backup", "--volume", str(img)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: "qemu-nbd" in children(run.pid).values(), "qemu-nbd serving the backup", run)
        served = [p for p, c in children(run.pid).items() if c == "qemu-nbd"]
    finally:
        run.kill()
        run.wait(30)
    try:
        until(lambda: qemu_processes(img) == [], "qemu-nbd gone with the run")
    finally:
        stop_left(img)  # (on the old code, the orphan went on serving)
    assert all(proc_field(p, 3) in ("", "Z") for p in served)  # gone, or dead and not yet reaped
    stale = [p.name for p in tmpdir.glob("dv-nbd-*")]
    assert len(stale) == 1 and stale[0].startswith(f"dv-nbd-{run.pid}-"), stale

    r = cli("--json", "backup", "--volume", str(img), env={"TMPDIR": str(tmpdir)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(tmpdir.glob("dv-nbd-*")) == []


@needs_root()
def test_only_our_own_dead_runs_socket_dirs_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltavault.platform import proc_start
    from deltavault.tracking.volume import nbdsock

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    me, start = os.getpid(), proc_start(os.getpid())
    dead = f"dv-nbd-{me}-{start + 1}-"  # our pid, another start time: a run that is gone

    def made(name: str, uid: int = os.geteuid()) -> Path:
        d = tmp_path / name
        d.mkdir(mode=0o700)
        (d / "sock").write_bytes(b"")
        os.chown(d, uid, uid)
        return d

    made(dead + "ours")
    alive = made(f"dv-nbd-{me}-{start}-alive")
    theirs = made(dead + "theirs", 65534)
    nested = made(dead + "nested")
    (nested / "sub").mkdir()
    target = made("elsewhere")
    (tmp_path / (dead + "link")).symlink_to(target)
    legacy = made("dv-nbd-abc123")
    assert nbdsock.sweep_stale() == [dead + "ours"]
    assert not (tmp_path / (dead + "ours")).exists()
    for kept in (alive, theirs, nested, legacy):
        assert (kept / "sock").exists(), kept
    assert (tmp_path / (dead + "link")).is_symlink() and (target / "sock").exists()
