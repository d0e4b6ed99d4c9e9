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
    holder = subprocess.Popen(["qemu-io", "-f", fmt, str(img)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:  # qemu-io holds the image (write lock) until its stdin closes, as a VM would
        # Its answer to a read says it has the image open. (Probing with qemu-img info raced
        # its start: an info holding the image first made qemu-io fail to take its lock.)
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        assert b"read 512/512 bytes" in holder.stdout.readline()
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
    map of the hostile VMDK (which spins for hours) is killed at 4 s of CPU time (its 3 s
    deadline and one)."""
    img = hostile_vmdk(tmp_path / "vm.vmdk", 1, 1 << 31, compressed=True)
    run, child = mapping(img, 3)
    try:
        limits = Path(f"/proc/{child}/limits").read_text().splitlines()
        assert [line.split()[3:5] for line in limits if line.startswith("Max cpu time")] == [["4", "4"]], limits
        os.kill(run.pid, signal.SIGSTOP)
        until(lambda: proc_field(child, 3) in ("Z", ""), "qemu-img killed at its CPU bound")
        assert proc_field(child, 3) == "Z"  # died while its parent was stopped: not reaped
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
        with pytest.raises(SourceError, match=r"qemu-img map .*: killed \(signal 9\); it may use 61 s of CPU time"):
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
    me, start, ns = os.getpid(), proc_start(os.getpid()), os.stat("/proc/self/ns/pid").st_ino
    dead = f"dv-nbd-{me}-{start + 1}-{ns}-"  # our pid, another start time: a run that is gone

    def made(name: str, uid: int = os.geteuid()) -> Path:
        d = tmp_path / name
        d.mkdir(mode=0o700)
        (d / "sock").write_bytes(b"")
        os.chown(d, uid, uid)
        return d

    made(dead + "ours")
    alive = made(f"dv-nbd-{me}-{start}-{ns}-alive")
    theirs = made(dead + "theirs", 65534)
    nested = made(dead + "nested")
    (nested / "sub").mkdir()
    target = made("elsewhere")
    (tmp_path / (dead + "link")).symlink_to(target)
    legacy = made("dv-nbd-abc123")
    unnamespaced = made(f"dv-nbd-{me}-{start + 1}-abc123")  # this version's first names
    assert nbdsock.sweep_stale() == [dead + "ours"]
    assert not (tmp_path / (dead + "ours")).exists()
    for kept in (alive, theirs, nested, legacy, unnamespaced):
        assert (kept / "sock").exists(), kept
    assert (tmp_path / (dead + "link")).is_symlink() and (target / "sock").exists()


@needs_root()
@needs_tools("unshare")
def test_a_live_runs_socket_dir_in_another_pid_namespace_is_kept(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run in a container sharing TMPDIR names its directory with the pid it sees (1 in a
    new pid namespace): here that pid is another process, of another start time, so the run
    looked gone and its live socket directory was removed."""
    from deltavault.tracking.volume import nbdsock

    code = ("import sys, tempfile; from deltavault.tracking.volume import nbdsock; "
            "print(nbdsock.make_dir(), flush=True); sys.stdin.read()")
    src = os.path.dirname(os.path.dirname(deltavault.__file__))
    env = {**os.environ, "PYTHONPATH": src, "TMPDIR": str(tmp_path)}
    inner = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert inner.stdout is not None
        made = Path(inner.stdout.readline().strip())
        assert made.parent == tmp_path and made.name.startswith("dv-nbd-1-"), made  # pid 1 in there
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        assert nbdsock.sweep_stale() == []
        assert made.is_dir()
    finally:
        inner.communicate("", timeout=30)
    assert inner.returncode == 0


def test_a_socket_dir_name_with_an_impossible_pid_does_not_stop_the_run(cli: Cli, tmp_path: Path) -> None:
    """Anyone may make a name in a shared TMPDIR: one whose pid is past what os.kill takes
    (a C int) made every run that reads an image fail with an OverflowError."""
    img, _ = random_image(tmp_path, "qcow2", 4 * MiB)
    assert cli("init").returncode == 0
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    ns = os.stat("/proc/self/ns/pid").st_ino
    planted = tmpdir / f"dv-nbd-{1 << 40}-1-{ns}-planted"
    planted.mkdir()
    left = {f"dv-nbd-{10 ** 30}-1-{ns}-file", f"dv-nbd-{1 << 40}-1-nonamespace"}  # a file; no namespace
    (tmpdir / f"dv-nbd-{10 ** 30}-1-{ns}-file").write_bytes(b"")
    (tmpdir / f"dv-nbd-{1 << 40}-1-nonamespace").mkdir()
    r = cli("--json", "backup", "--volume", str(img), env={"TMPDIR": str(tmpdir)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert not planted.exists()  # ours, and no run can have that pid
    assert {p.name for p in tmpdir.glob("dv-nbd-*")} == left


def test_a_long_tmpdir_still_serves_the_image(cli: Cli, tmp_path: Path) -> None:
    """A unix socket's path has at most 107 bytes: the socket had been $TMPDIR/dv-nbd-.../sock,
    so a TMPDIR longer than 87 bytes (69 once the run's pid and start time were in the name)
    failed every image backup with "UNIX socket path ... is too long"."""
    img, _ = random_image(tmp_path, "qcow2", 4 * MiB)
    assert cli("init").returncode == 0
    tmpdir = tmp_path / ("t" * max(1, 110 - len(str(tmp_path))))
    tmpdir.mkdir()
    assert len(str(tmpdir)) >= 110
    r = cli("--json", "backup", "--volume", str(img), env={"TMPDIR": str(tmpdir)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(tmpdir.glob("dv-nbd-*")) == []


def test_an_image_named_relative_to_our_directory_is_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-nbd runs in its socket's directory: a relative image name is ours, not its."""
    from deltavault.tracking.volume.qemu import NbdServer

    img, raw = random_image(tmp_path, "qcow2", 4 * MiB)
    monkeypatch.chdir(tmp_path)
    server = NbdServer(img.name, None)
    try:
        h = server.connect(["base:allocation"])
        assert h.get_size() == 4 * MiB and h.pread(MiB, 0) == raw.read_bytes()[:MiB]
        h.shutdown()
    finally:
        server.stop()
    assert not os.path.exists(server.dir)


def test_qemus_error_naming_a_path_not_in_utf_8_is_reported(tmp_path: Path) -> None:
    """qemu-img's error names the image in its bytes: decoded strictly as UTF-8, a damaged
    image under such a name ended in a UnicodeDecodeError (a traceback) instead of its error.
    (backup --volume of such a name stops before, naming its state file: not qemu's part.)"""
    img = os.path.join(os.fsencode(tmp_path), b"disk\xff.qcow2")
    with open(img, "wb") as f:
        f.write(b"QFI\xfb\x00\x00\x00\x09" + bytes(4096))  # a qcow2 of a version that is none
    with pytest.raises(SourceError, match="Unsupported qcow2 version 9"):
        image_map(os.fsdecode(img), "qcow2", 0, 4096)


@needs_root()
@needs_tools("prlimit", "setpriv")
def test_a_run_under_a_lower_cpu_limit_keeps_it(cli: Cli, tmp_path: Path) -> None:
    """Under `ulimit -t 60` (hard) a user cannot raise the limit to qemu-img's 120 s: setting
    it failed in the child, and every image backup ended in "Exception occurred in
    preexec_fn" (a traceback). The lower limit now stands. (Root, without CAP_SYS_RESOURCE,
    is such a user.)"""
    img, _ = random_image(tmp_path, "qcow2", 4 * MiB)
    assert cli("init").returncode == 0
    r = subprocess.run(["prlimit", "--cpu=60:60", "setpriv", "--bounding-set", "-sys_resource", "--inh-caps",
                        "-sys_resource", sys.executable, "-m", "deltavault", *cli.options, "--json", "backup",
                        "--volume", str(img)], env=cli.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
