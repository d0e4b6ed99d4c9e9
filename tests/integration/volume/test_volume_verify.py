"""restore --volume --verify: a restored file's holes are checked against the zero page's
digest without being read; data is read and hashed; a block device is read whole. What
differs is reported page by page, whether it is a hole where the snapshot has data or
data changed in place."""

from __future__ import annotations

import os
from pathlib import Path

from deltavault.objects.volumes import load_manifest
from deltavault.restore.volume import VolumeRestoreOptions, VolumeRestorer, VolumeRestoreStats
from tests.conftest import needs_root
from tests.integration.volume.conftest import Vol, loop, run
from tests.integration.volume.test_volume_sparse_scale import sparse, write_at

MIB = 1 << 20
PAGE = 4096
# Over three 64 MiB digest segments, a tail that is not a whole page; one island across
# the first segment boundary, one whole block, one ending in the last, short page's segment.
SIZE = 200 * MIB + 12_345
ISLANDS = [(64 * MIB - 8 * PAGE, MIB), (100 * MIB, 2 * MIB), (SIZE - 3 * MIB - 12_345, MIB)]
DATA_PAGES = sum(n for _, n in ISLANDS) // PAGE
PAGES = -(-SIZE // PAGE)


def restorer(vol: Vol, sid: str, target: Path, verify: bool) -> VolumeRestorer:
    _sid, snap = vol.repo.resolve_snapshot(sid)
    assert snap.volume is not None
    key = vol.repo.master.mac if vol.repo.master else None
    return VolumeRestorer(vol.repo, load_manifest(vol.repo, snap.volume), str(target),
                          VolumeRestoreOptions(overwrite=True, verify=verify, page_key=key))


def verify_again(vol: Vol, sid: str, target: Path) -> VolumeRestoreStats:
    """Verify an image restored earlier, as it is now."""
    r = restorer(vol, sid, target, verify=True)
    fd = os.open(target, os.O_RDONLY)
    try:
        r.verify(fd)
    finally:
        os.close(fd)
    return r.stats


def test_a_sparse_restore_verifies_its_holes_unread(vol: Vol, tmp_path: Path) -> None:
    img = sparse(tmp_path / "src.img", SIZE, ISLANDS)
    sid = vol.backup(img, block_size=256 * 1024).snapshot_id
    st = restorer(vol, sid, tmp_path / "back.img", verify=True).run()
    assert st.pages_mismatched == 0 and st.mismatches == []
    assert st.pages_verified == PAGES
    # The islands' blocks are written whole (a block part data, part hole is data), so
    # what is read back is the data pages and the rest of their blocks, not the volume.
    assert DATA_PAGES <= st.pages_hashed <= DATA_PAGES + 6 * (256 * 1024 // PAGE)
    assert (tmp_path / "back.img").read_bytes() == img.read_bytes()


def test_a_hole_where_the_snapshot_has_data_and_changed_data_are_caught(vol: Vol, tmp_path: Path) -> None:
    img = sparse(tmp_path / "src.img", SIZE, ISLANDS)
    sid = vol.backup(img, block_size=256 * 1024).snapshot_id
    back = tmp_path / "back.img"
    restorer(vol, sid, back, verify=False).run()
    clean = verify_again(vol, sid, back)
    assert clean.pages_mismatched == 0 and clean.pages_verified == PAGES

    # 64 pages of the second island punched out: read as zeros without being read, and
    # reported as 64 pages that differ, the first 20 by number.
    first = 100 * MIB // PAGE + 16
    run("fallocate", "--punch-hole", "--offset", str(first * PAGE), "--length", str(64 * PAGE), str(back))
    st = verify_again(vol, sid, back)
    assert st.pages_verified == PAGES
    assert st.pages_mismatched == 64 and st.mismatches == list(range(first, first + 20))
    assert st.pages_hashed == clean.pages_hashed - 64

    # A byte changed in the data across the segment boundary, and one in the last page.
    write_at(back, 64 * MIB + 5, b"\xff")
    write_at(back, SIZE - 3 * MIB - 12_345, b"\xff")
    st = verify_again(vol, sid, back)
    boundary, last = 64 * MIB // PAGE, (SIZE - 3 * MIB - 12_345) // PAGE
    assert st.pages_mismatched == 66
    assert st.mismatches == [boundary, *range(first, first + 19)]
    assert last not in st.mismatches  # after the first 20, counted only

    # Data written into a hole of the snapshot is read (it is no hole any more) and differs.
    write_at(back, 150 * MIB, b"x" * 10)
    st = verify_again(vol, sid, back)
    assert st.pages_mismatched == 67 and st.pages_hashed > clean.pages_hashed - 64


@needs_root()
def test_a_device_target_is_read_whole(vol: Vol, tmp_path: Path) -> None:
    img = sparse(tmp_path / "src.img", SIZE, ISLANDS)
    sid = vol.backup(img, block_size=256 * 1024).snapshot_id
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:  # not zeros: the holes the restore zeroes must read back as zeros
        for _ in range(SIZE // MIB + 1):
            f.write(os.urandom(MIB))
    with loop(disk) as dev:
        st = restorer(vol, sid, Path(dev), verify=True).run()
    assert st.target_kind == "device"
    assert st.pages_mismatched == 0 and st.pages_verified == PAGES and st.pages_hashed == PAGES
