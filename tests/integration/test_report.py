"""deltavault report on a real repository: file and volume snapshots made here, a fallback
run, a failed run and a check; the data, the page, old snapshots, status records, bad input."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
from dataclasses import asdict
from pathlib import Path

import msgspec
import pytest
from pyroaring import BitMap

from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.backup.volume.options import VolumeOptions, VolumeRequest, block_sets
from deltavault.backup.volume.run import run_volume_backup
from deltavault.errors import BackendError, SourceError, UsageError
from deltavault.maintenance.check import check_record, check_repository
from deltavault.maintenance.report.build import build_report
from deltavault.maintenance.report.page import render_html
from deltavault.maintenance.report.select import ReportOptions
from deltavault.maintenance.retention import Policy
from deltavault.model.snapshot import SnapshotSummary
from deltavault.model.status import CHECK, FAILED, StatusRecord
from deltavault.repository.envelope import Envelope
from deltavault.repository.repository import Repository
from deltavault.repository.status import KEEP, StatusStore, failed_run, worth_recording
from deltavault.testing.faulty import Fault, FaultyBackend
from deltavault.testing.memory import MemoryBackend
from tests.browser import CHROMIUM, Browser
from tests.conftest import Cli

MiB = 1 << 20
RACY = 50_000_000


def files_backup(repo: Repository, src: Path):  # type: ignore[no-untyped-def]
    time.sleep(0.06)
    return run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=RACY)))


def volume_backup(repo: Repository, img: Path, **opts: object):  # type: ignore[no-untyped-def]
    return run_volume_backup(repo, VolumeRequest(str(img), source_id="img", options=VolumeOptions(**opts)))  # type: ignore[arg-type]


def scribble_blocks(img: Path, blocks: list[int]) -> None:
    with open(img, "r+b") as f:
        for b in blocks:
            f.seek(b * MiB + 12345)
            f.write(os.urandom(5000))


@pytest.fixture
def world(repo: Repository, tmp_path: Path) -> dict[str, object]:
    """Two files runs, two volume runs (the second falls back to block digests: the image
    holds no file system), one failed volume run, one check."""
    rnd = random.Random(5)
    src = tmp_path / "src"
    for d in ("docs", "media", "logs/old"):
        (src / d).mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n" * 5000)
    (src / "media" / "pic.bin").write_bytes(rnd.randbytes(400_000))
    (src / "logs" / "old" / "x.log").write_bytes(rnd.randbytes(50_000))
    f1 = files_backup(repo, src)
    (src / "media" / "new").mkdir()
    (src / "media" / "new" / "big.bin").write_bytes(rnd.randbytes(900_000))
    (src / "docs" / "a.txt").write_text("beta\n" * 7000)
    f2 = files_backup(repo, src)
    img = tmp_path / "disk.img"
    img.write_bytes(rnd.randbytes(16 * MiB))
    v1 = volume_backup(repo, img)
    scribble_blocks(img, [3, 10])
    v2 = volume_backup(repo, img)
    with pytest.raises(UsageError):
        volume_backup(repo, tmp_path / "missing.img")
    start = time.time_ns()
    assert repo.save_status(check_record(check_repository(repo), read_data=False, start_ns=start)) is None
    return {"src": src, "img": img, "f1": f1, "f2": f2, "v1": v1, "v2": v2}


def test_the_report_of_a_real_repository(repo: Repository, world: dict) -> None:  # type: ignore[type-arg]
    rep = build_report(repo, ReportOptions(policy=Policy(last=1)))
    assert rep.snapshots == rep.snapshots_total == 4
    files, vol = rep.sources  # the failed run is the volume source's too (same source id)
    # timeline: what each run read and added, and how it knew what changed
    r1, r2 = files.runs
    assert (r1.change_label, r1.files_new) == ("full read (first run)", 3)
    assert (r2.change_source, r2.files_new, r2.files_changed, r2.files_unmodified) == ("catalog", 1, 1, 2)
    assert r2.bytes_read >= 900_000 and r2.bytes_added_raw > 900_000 and r2.seconds > 0
    v1, v2, f = vol.runs
    assert v1.change_label == "full read (first run)" and v1.blocks_changed == 16
    assert v2.change_source == "block-digests" and v2.fallback and v2.change_label == "full read (block digests)"
    assert [x["source"] for x in v2.rejected] == ["fs-digests"]
    assert "no partition table" in v2.rejected[0]["reason"]
    assert (v2.blocks_total, v2.blocks_read, v2.blocks_changed) == (16, 16, 2)
    assert f.status == "failed" and "missing.img" in f.message and f.message.startswith("UsageError")
    # heatmap: 16 regions of 1 MiB; the incremental run changed blocks 3 and 10
    [hm] = rep.heatmaps
    assert (hm.regions, hm.region_bytes) == (16, MiB)
    assert [i for i, c in enumerate(hm.counts) if c] == [3, 10]
    assert hm.runs_counted == [world["v2"].snapshot_id]
    assert [r.changed for r in hm.runs] == [[[0, 16]], [[3, 4], [10, 11]]]
    assert hm.runs[1].read == [[0, 16]]
    # where the bytes went: the new big file's directory added most
    [wb] = rep.where
    assert (wb.snapshot_from, wb.snapshot_to) == (world["f1"].snapshot_id, world["f2"].snapshot_id)
    assert wb.directories[0].path == "src/media/new" and wb.directories[0].bytes_own > 900_000
    assert wb.largest[0].path == "src/media/new/big.bin" and wb.largest[0].change == "new"
    assert {f.path: f.change for f in wb.largest}["src/docs/a.txt"] == "changed"
    assert (wb.files_new, wb.files_changed, wb.files_removed) == (1, 1, 0)
    # health: ratios over time, the check, retention as forget would apply it
    h = rep.health
    assert h is not None and len(h.series) == 4 and h.points_without_raw == 0
    assert all(p.compression and p.dedup for p in h.series)
    assert h.last_check is not None and h.last_check["ok"] and h.last_check["snapshots"] == 4
    assert (h.retention_keep, h.retention_forget) == (2, 2)
    assert [r.retention for r in files.runs] == ["forget", "keep"]
    assert rep.warnings == []


def test_the_page_is_a_view_of_the_json(repo: Repository, world: dict) -> None:  # type: ignore[type-arg]
    rep = build_report(repo, ReportOptions())
    page = render_html(rep)
    m = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S)
    assert m is not None
    assert json.loads(m.group(1).replace("<\\/", "</")) == json.loads(json.dumps(asdict(rep)))
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # nothing to fetch: no URL in any attribute that loads something
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|ftp:)""", page)
    assert not re.search(r"@import|url\((?!#)", page)
    for section in ("timeline", "heatmap", "where", "health"):
        assert f'<section id="{section}">' in page
    assert page.count("<svg") == 6  # 2 timelines, heatmap, runs, where, health


class OldSummary(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A snapshot summary as an older deltavault declared it (some of its fields)."""

    files_new: int = 0
    bytes_processed: int = 0
    bytes_total: int = 0
    bytes_added: int = 0
    seconds: float = 0.0


class OldSnapshot(msgspec.Struct, omit_defaults=True, kw_only=True):
    time: str
    time_ns: int
    hostname: str
    kind: str = "files"
    summary: OldSummary | None = None


def test_old_snapshots_render_with_what_they_have(repo: Repository, world: dict) -> None:  # type: ignore[type-arg]
    """A snapshot as an older deltavault wrote it (no change source, raw bytes or block
    sets) is shown with what it has; and an older reader reads the new snapshots."""

    sid = world["v2"].snapshot_id
    raw = repo.env.open(repo.backend.get(f"snapshots/{sid}"), aad=b"snapshot")
    old_view = msgspec.msgpack.decode(raw, type=OldSnapshot)  # the new fields are ignored
    assert old_view.summary is not None and old_view.summary.bytes_total == 16 * MiB
    snap = repo.load_snapshot(sid)
    s = snap.summary
    assert s is not None
    older = msgspec.structs.replace(snap, time_ns=snap.time_ns + 1000, parent=sid, summary=SnapshotSummary(
        bytes_processed=s.bytes_processed, bytes_total=s.bytes_total, bytes_added=s.bytes_added, seconds=s.seconds))
    old_id = repo.save_snapshot(older)
    rep = build_report(repo, ReportOptions())
    vol = next(x for x in rep.sources if x.id == "img")
    old = next(r for r in vol.runs if r.snapshot == old_id)
    assert old.change_label == "not recorded" and old.bytes_read == s.bytes_processed and not old.fallback
    [hm] = rep.heatmaps
    assert hm.runs_without_blocks == 1 and old_id not in hm.runs_counted
    assert rep.health is not None and rep.health.points_without_raw == 1
    assert any("older deltavault" in w for w in rep.warnings)
    assert "not recorded" in render_html(rep)


def test_block_sets_stay_small_on_a_large_volume() -> None:
    size = 200 << 30  # 200 GiB of 1 MiB blocks: 204,800 blocks, in units of 4 MiB
    read = BitMap(range(0, 204_800))
    changed = BitMap([5, 6, 7, 204_799])
    bs = block_sets(size, MiB, read, changed, [])
    assert bs.unit == 4 * MiB
    assert list(BitMap.deserialize(bs.changed)) == [1, 51_199]
    assert len(BitMap.deserialize(bs.read)) == 51_200 and len(bs.read) < 100
    assert block_sets(64 * MiB, MiB, BitMap([1]), BitMap([1]), []).unit == MiB


def test_status_records(repo: Repository) -> None:
    exc = SourceError("the volume vanished")
    rec = failed_run(snapshot_kind="volume", source_id="s", paths=["/dev/x"], hostname="h", start_ns=10**18, exc=exc)
    assert (rec.error, rec.exit_code, rec.ok) == ("SourceError", 16, False)
    assert worth_recording(exc) and not worth_recording(BackendError("gone")) and not worth_recording(KeyboardInterrupt())
    for i in range(KEEP[CHECK] + 3):
        assert repo.save_status(StatusRecord(kind=CHECK, time="t", time_ns=10**18 + i, hostname="h",
                                             snapshots=i)) is None
    names = repo.status.names(CHECK)
    assert len(names) == KEEP[CHECK]
    assert [r.snapshots for r in repo.status_records(CHECK, newest=2)] == [KEEP[CHECK] + 1, KEEP[CHECK] + 2]
    # a damaged record, and an authentic one under another record's name, are left out
    path = Path(repo.backend.location()) / names[-1]
    raw = path.read_bytes()
    path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))  # always a change, even when the byte was 0
    sealed = repo.backend.get(names[-2])
    swapped = names[-3].rsplit("-", 1)[0] + "-" + names[-2].rsplit("-", 1)[1]
    repo.backend.put(swapped, sealed)
    kept = [r.snapshots for r in repo.status_records(CHECK)]
    assert KEEP[CHECK] + 2 not in kept and kept.count(KEEP[CHECK] + 1) == 1
    assert set(repo.status.damaged) >= {names[-1], swapped}
    assert repo.status_records(FAILED) == []


def test_a_record_is_saved_when_old_ones_cannot_be_deleted() -> None:
    """An immutable repository refuses to delete what is under retention: the new record is
    kept all the same (and said to be); a put that fails is said."""
    backend = FaultyBackend(MemoryBackend(), [Fault(ops=("delete",), prefix="status/", retryable=False)])
    store = StatusStore(backend, Envelope(None))
    for i in range(KEEP[CHECK] + 2):
        assert store.save(StatusRecord(kind=CHECK, time="t", time_ns=10**18 + i, hostname="h")) is None
    assert len(store.names(CHECK)) == KEEP[CHECK] + 2
    assert store.records(CHECK, newest=1)[0].time_ns == 10**18 + KEEP[CHECK] + 1
    backend.faults.append(Fault(ops=("put",), prefix="status/", retryable=False, message="disk on fire"))
    assert store.save(StatusRecord(kind=CHECK, time="t", time_ns=2 * 10**18, hostname="h")).endswith("disk on fire")  # type: ignore[union-attr]


def test_selection(repo: Repository, world: dict) -> None:  # type: ignore[type-arg]
    f2 = world["f2"].snapshot_id
    rep = build_report(repo, ReportOptions(snapshots=[f2[:10]]))
    assert rep.snapshots == 1 and [s.kind for s in rep.sources] == ["files"]  # no failures with named ones
    assert rep.where[0].snapshot_from == world["f1"].snapshot_id  # compared with its parent
    rep = build_report(repo, ReportOptions(sources=[str(world["img"])]))
    assert [s.id for s in rep.sources] == ["img"] and len(rep.heatmaps) == 1
    assert build_report(repo, ReportOptions(since="1h")).snapshots == 4
    for opts, says in ((ReportOptions(snapshots=["ffffffff"]), "no snapshot matches 'ffffffff'"),
                       (ReportOptions(sources=["nope"]), "no snapshot has that source id or path"),
                       (ReportOptions(since="2999-01-01"), "no snapshot matches since 2999-01-01"),
                       (ReportOptions(since="yesterday"), "not a date or a duration")):
        with pytest.raises(UsageError, match=says):
            build_report(repo, opts)


def test_an_empty_repository_is_refused(repo: Repository) -> None:
    with pytest.raises(UsageError, match="no snapshots yet"):
        build_report(repo, ReportOptions())


def test_cli_report_and_its_bad_input(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").returncode == 0
    out = tmp_path / "r.html"
    r = cli("report", "--html", str(out))
    assert r.returncode == 2 and "no snapshots yet" in r.stderr and not out.exists()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 10_000)
    assert cli("backup", str(src)).returncode == 0
    assert cli("check").returncode == 0
    r = cli("report", "--html", str(out), "--keep-last", "1")
    assert r.returncode == 0 and "report of 1 snapshot(s) of 1 source(s) written to" in r.stdout, r.stderr
    assert out.read_text().startswith("<!DOCTYPE html>") and r.stderr == ""
    j = cli("--json", "report", "--keep-last", "1")
    assert j.returncode == 0, j.stderr
    data = j.last("report")
    assert data["html"] is None and data["snapshots"] == 1 and data["health"]["last_check"]["ok"]
    assert data["sources"][0]["runs"][0]["retention"] == "keep"
    assert data["sources"][0]["hostname"] == socket.gethostname()
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(2 * MiB))
    assert cli("backup", "--volume", str(img)).returncode == 0
    assert cli("backup", "--volume", str(img)).returncode == 0
    [vs] = [s for s in cli("--json", "snapshots").json if s["kind"] == "volume" and s["parent"]]
    assert vs["summary"]["rejected"][0]["source"] == "fs-digests"  # stored structs print as objects
    assert vs["summary"]["blocks"]["unit"] == MiB
    (tmp_path / "adir").mkdir()
    for args, says in ((["deadbeef"], "no snapshot matches 'deadbeef'"),
                       (["--source", "/no/such"], "no snapshot has that source id or path"),
                       (["--since", "soon"], "not a date or a duration"),
                       (["--html", str(tmp_path / "no-dir" / "r.html")], "cannot write the report"),
                       (["--html", str(tmp_path / "adir")], "it is a directory"),
                       (["--keep-last", "1", "--group-by", "color"], "cannot group by")):
        r = cli("report", *args, "--html", str(tmp_path / "x.html")) if "--html" not in args else cli("report", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.html").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.html")]  # no temp file left


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (scripts/install-system-deps.sh)")
def test_the_page_renders_in_chromium_without_root(repo: Repository, world: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """The same checks as the partitioned-disk test (tests/integration/volume), on a plain
    image, for machines without loop devices."""
    page = tmp_path / "r.html"
    page.write_text(render_html(build_report(repo, ReportOptions(policy=Policy(last=1)))))
    with Browser() as b:
        requests = b.load(page.as_uri())
        facts = b.evaluate("""({
          sections: ['timeline', 'heatmap', 'where', 'health'].map(id => document.querySelector('#' + id + ' h2')?.textContent),
          coloured: [...document.querySelectorAll('#heatmap g[id^="hm0-region-"] path')]
                    .map((p, i) => [i, getComputedStyle(p).fill]).filter(([i, f]) => f !== 'rgb(236, 236, 236)').map(([i]) => i),
          regions: document.querySelectorAll('#heatmap g[id^="hm0-region-"]').length,
          fallback: [...document.querySelectorAll('#timeline tr.fallback')].map(tr => tr.innerText),
          failed: document.querySelectorAll('#timeline tr.failed').length})""")
    assert [u for u in requests if not u.startswith("data:image/png;base64,")] == [page.as_uri()], requests
    assert facts["sections"] == ["Timeline", "Block changes", "Where the bytes went", "Repository health"]
    assert facts["regions"] == 16 and facts["coloured"] == [3, 10]
    assert len(facts["fallback"]) == 1 and "no partition table" in facts["fallback"][0]
    assert facts["failed"] == 1


def test_the_report_reads_no_file_or_volume_content(repo: Repository, world: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """The report reads the index, snapshots, status records and trees: no byte of any
    DATA blob (file or volume content) is fetched from the repository, also without a cache."""
    from deltavault.backends.local import LocalBackend
    from deltavault.model.types import BlobType
    from tests.conftest import PASSWORD

    backend = LocalBackend(tmp_path / "repo", fsync=False)
    reads: list[tuple[str, int, int | None]] = []
    real_get = backend.get

    def get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        reads.append((name, offset, length))
        return real_get(name, offset, length)

    backend.get = get  # type: ignore[method-assign]
    fresh = Repository.open(backend, lambda: PASSWORD, use_cache=False)
    content = {f"data/{p.hex()[:2]}/{p.hex()}": [(e.offset, e.offset + e.length) for e in es if e.type == BlobType.DATA]
               for p, es in fresh.index.entries_by_pack().items()}
    assert sum(map(len, content.values())) > 0
    reads.clear()
    rep = build_report(fresh, ReportOptions())
    assert rep.snapshots == 4 and rep.where and rep.heatmaps
    touched = [(name, off, ln) for name, off, ln in reads if name.startswith("data/")]
    assert touched, "trees are read from packs"
    for name, off, ln in touched:
        end = off + ln if ln is not None else 1 << 62
        for a, b in content.get(name, []):
            assert end <= a or off >= b, f"the report read content: {name} [{off}, {end}) holds a DATA blob [{a}, {b})"
