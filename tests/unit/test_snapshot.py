"""Snapshot providers: command lines and parsing of the tools' output. LVM and VSS cannot
run on the development machine (no device-mapper; not Windows), so these are their tests;
btrfs also runs for real in tests/integration/sync/test_sync_snapshot.py."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from deltavault.errors import SnapshotError
from deltavault.fs.mounts import device_mounts, find_mount, parse_mountinfo
from deltavault.snapshot import make_snapshotter, take_snapshot
from deltavault.snapshot.base import SnapshotHandle
from deltavault.snapshot.btrfs import delete_command, snapshot_command
from deltavault.snapshot.lvm import (
    LogicalVolume,
    LvmSnapshotter,
    lvcreate_command,
    lvremove_command,
    lvs_command,
    mount_command,
    parse_lvs,
)
from deltavault.snapshot.none import NoSnapshot
from deltavault.snapshot.vss import (
    POWERSHELL,
    VssSnapshotter,
    create_script,
    delete_script,
    parse_create,
    volume_of,
)

# Recorded on the development machine (lvm2 2.03, no volume groups): the report's shape.
LVS_EMPTY = '  {\n      "report": [\n          {\n              "lv": [\n              ]\n          }\n      ]\n  }\n'
# The same report with one row, as lvs prints it for a mounted LV (values from lvmreport(7)'s fields).
LVS_ONE = ('  {\n      "report": [\n          {\n              "lv": [\n                  {"vg_name":"vg0", '
           '"lv_name":"home", "lv_attr":"-wi-ao----", "lv_size":"53687091200"}\n              ]\n          }\n'
           '      ]\n  }\n')
MOUNTINFO = (
    "22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    "40 22 253:2 / /home rw,relatime shared:20 - xfs /dev/mapper/vg0-home rw,attr2\n"
    "41 22 0:45 /@data /srv/my\\040data rw,relatime shared:21 - btrfs /dev/vdb rw,space_cache=v2,subvol=/@data\n"
)


class Recorder:
    def __init__(self, outputs: dict[str, str]) -> None:
        self.outputs = outputs
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: Sequence[str], *, input: str | None = None) -> str:
        self.calls.append((list(argv), input))
        return self.outputs.get(argv[0], "")


def test_mountinfo_parsing_and_longest_prefix() -> None:
    ms = parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in ms] == ["/", "/home", "/srv/my data"]
    assert ms[2].root == "/@data" and ms[2].fstype == "btrfs"
    assert find_mount("/home/bob", MOUNTINFO).source == "/dev/mapper/vg0-home"
    assert find_mount("/homeless", MOUNTINFO).mount_point == "/"
    assert find_mount("/srv/my data/x", MOUNTINFO).fstype == "btrfs"


def test_mounts_of_a_device_and_whether_they_are_writable() -> None:
    """What volume backup warns about (a volume mounted read-write) and volume restore
    refuses (a mounted target device) both come from here."""
    ro = MOUNTINFO + "42 22 253:2 / /mnt/ro ro,relatime shared:22 - xfs /dev/mapper/vg0-home rw,attr2\n"
    found = device_mounts({"253:2"}, ro)
    assert [(m.mount_point, m.writable) for m in found] == [("/home", True), ("/mnt/ro", False)]
    assert device_mounts({"7:0"}, ro) == []


def test_btrfs_commands() -> None:
    assert snapshot_command("/data", "/data/.deltavault-snapshots/s1") == [
        "btrfs", "subvolume", "snapshot", "-r", "/data", "/data/.deltavault-snapshots/s1"]
    assert delete_command("/x/s") == ["btrfs", "subvolume", "delete", "--commit-after", "/x/s"]


def test_lvs_parsing() -> None:
    assert parse_lvs(LVS_ONE) == LogicalVolume("vg0", "home", "-wi-ao----")
    with pytest.raises(SnapshotError, match="not an LVM logical volume"):
        parse_lvs(LVS_EMPTY, "/dev/vda")
    with pytest.raises(SnapshotError, match="cannot read"):
        parse_lvs('  Volume group "vda" not found')


def test_lvm_command_lines() -> None:
    lv = LogicalVolume("vg0", "home", "")
    assert lvs_command("/dev/mapper/vg0-home")[-1] == "/dev/mapper/vg0-home"
    assert lvcreate_command(lv, "home-dvsnap-1") == [
        "lvcreate", "--snapshot", "--permission", "r", "--extents", "10%ORIGIN", "--name", "home-dvsnap-1",
        "vg0/home"]
    assert mount_command("/dev/vg0/s", "xfs", "/m") == ["mount", "-t", "xfs", "-o", "ro,nouuid,norecovery",
                                                        "/dev/vg0/s", "/m"]
    assert mount_command("/dev/vg0/s", "ext4", "/m")[4] == "ro,noload"
    assert lvremove_command(lv, "home-dvsnap-1") == ["lvremove", "--yes", "vg0/home-dvsnap-1"]


def test_lvm_create_and_remove_sequence(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import deltavault.snapshot.lvm as lvm_mod

    monkeypatch.setattr(lvm_mod, "find_mount", lambda p: parse_mountinfo(MOUNTINFO)[1])
    monkeypatch.setattr(lvm_mod.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "mnt"))
    (tmp_path / "mnt").mkdir()
    rec = Recorder({"lvs": LVS_ONE})
    snap = LvmSnapshotter(rec)
    h = snap.create("/home/bob/docs")
    assert h.kind == "lvm" and h.source_path == str(tmp_path / "mnt" / "bob/docs")
    name = rec.calls[1][0][7]
    assert [c[0][0] for c in rec.calls] == ["lvs", "lvcreate", "mount"]
    assert rec.calls[2][0][-2:] == [f"/dev/vg0/{name}", str(tmp_path / "mnt")]
    snap.remove(h)
    assert [c[0][0] for c in rec.calls[3:]] == ["umount", "lvremove"]
    assert rec.calls[4][0][-1] == f"vg0/{name}" and not (tmp_path / "mnt").exists()


def test_lvm_refuses_a_snapshot_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    out = LVS_ONE.replace("-wi-ao----", "swi-aos---")
    with pytest.raises(SnapshotError, match="itself a snapshot"):
        LvmSnapshotter(Recorder({"lvs": out})).lookup(parse_mountinfo(MOUNTINFO)[1])


def test_vss_volume_and_scripts() -> None:
    assert volume_of(r"C:\Users\bob") == ("C:\\", r"Users\bob")
    assert volume_of("d:\\") == ("D:\\", "")
    with pytest.raises(SnapshotError, match="drive letter"):
        volume_of(r"\\server\share\x")
    s = create_script("C:\\")
    assert "Invoke-CimMethod -ClassName Win32_ShadowCopy -MethodName Create" in s
    assert "Volume='C:\\'" in s and "Context='ClientAccessible'" in s and "ConvertTo-Json" in s
    assert "Remove-CimInstance" in delete_script("{0E4B7F3A-1C2D-4E5F-8A9B-0C1D2E3F4A5B}")
    with pytest.raises(SnapshotError):
        delete_script("x' or 1=1")  # the ID goes into a WQL filter: only a GUID passes


VSS_OK = json.dumps({"ReturnValue": 0, "ShadowID": "{0E4B7F3A-1C2D-4E5F-8A9B-0C1D2E3F4A5B}",
                     "DeviceObject": "\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy7"})


def test_vss_parse_results() -> None:
    sid, dev = parse_create(VSS_OK + "\r\n")
    assert sid.startswith("{0E4B") and dev.endswith("ShadowCopy7")
    with pytest.raises(SnapshotError, match=r"\(1\): access denied"):
        parse_create('{"ReturnValue":1,"ShadowID":null,"DeviceObject":null}')
    with pytest.raises(SnapshotError, match="insufficient storage"):
        parse_create('{"ReturnValue":6}')
    with pytest.raises(SnapshotError, match="cannot read"):
        parse_create("Invoke-CimMethod : Access is denied.")


def test_vss_create_maps_the_path_into_the_shadow_copy() -> None:
    rec = Recorder({"powershell.exe": VSS_OK})
    v = VssSnapshotter(rec)
    h = v.create(r"C:\Data\Projects")
    assert rec.calls[0][0] == POWERSHELL and "Volume='C:\\'" in (rec.calls[0][1] or "")
    assert h.source_path == "\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy7\\Data\\Projects"
    v.remove(h)
    assert "{0E4B7F3A-1C2D-4E5F-8A9B-0C1D2E3F4A5B}" in (rec.calls[1][1] or "")


class _Fake:
    kind = "fake"

    def __init__(self) -> None:
        self.removed: list[SnapshotHandle] = []

    def create(self, path: str) -> SnapshotHandle:
        return SnapshotHandle("fake", "/snap", "/snap/x", path, ident="id1")

    def remove(self, handle: SnapshotHandle) -> None:
        self.removed.append(handle)


def test_take_snapshot_removes_on_error_and_interrupt(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import deltavault.snapshot as snap_mod

    fake = _Fake()
    monkeypatch.setattr(snap_mod, "make_snapshotter", lambda kind, path, runner: fake)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), take_snapshot(str(tmp_path), "btrfs"):
            raise exc
    with take_snapshot(str(tmp_path), "btrfs") as h:
        assert h.source_path == "/snap/x"
    assert len(fake.removed) == 3


def test_auto_on_a_plain_file_system_reads_live_files(tmp_path) -> None:
    s = make_snapshotter("auto", str(tmp_path))
    assert isinstance(s, NoSnapshot) and "reading the live files" in s.note
