"""Windows Volume Shadow Copy (VSS) through WMI/CIM: ``Win32_ShadowCopy.Create`` on the
path's volume, read through ``\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopyN``.

Runs PowerShell (5.1 or 7; CIM cmdlets exist in both) and parses its JSON. Windows only:
on the development machine the command construction and output parsing are unit-tested.
"""

from __future__ import annotations

import json
import ntpath
import re

from deltavault.errors import SnapshotError
from deltavault.snapshot.base import Runner, SnapshotHandle, run_command

# Return codes of Win32_ShadowCopy.Create (Microsoft's VSS WMI provider documentation).
CREATE_ERRORS = {
    1: "access denied (run as Administrator)",
    2: "invalid argument",
    3: "specified volume not found",
    4: "specified volume not supported",
    5: "unsupported shadow copy context",
    6: "insufficient storage",
    7: "volume is in use",
    8: "maximum number of shadow copies reached",
    9: "another shadow copy operation is already in progress",
    10: "shadow copy provider vetoed the operation",
    11: "shadow copy provider not registered",
    12: "shadow copy provider failure",
    13: "unknown error",
}
_GUID = re.compile(r"^\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}$")
_DEVICE = re.compile(r"^\\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy\d+$")
POWERSHELL = ["powershell.exe", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-Command", "-"]


def _ps_quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def volume_of(path: str) -> tuple[str, str]:
    """('C:\\\\', 'Users\\\\bob') for 'C:\\\\Users\\\\bob'. Drive-letter volumes only."""
    drive, rest = ntpath.splitdrive(ntpath.normpath(path))
    if not re.fullmatch(r"[A-Za-z]:", drive):
        raise SnapshotError(f"VSS needs a path on a drive letter (like C:\\data), not {path}")
    return drive.upper() + "\\", rest.strip("\\")


def create_script(volume: str) -> str:
    return ("$ErrorActionPreference = 'Stop'\n"
            "$r = Invoke-CimMethod -ClassName Win32_ShadowCopy -MethodName Create "
            f"-Arguments @{{Volume={_ps_quote(volume)}; Context='ClientAccessible'}}\n"
            "$d = $null\n"
            "if ($r.ReturnValue -eq 0) { $d = (Get-CimInstance -ClassName Win32_ShadowCopy "
            "-Filter (\"ID='\" + $r.ShadowID + \"'\")).DeviceObject }\n"
            "@{ReturnValue=[int]$r.ReturnValue; ShadowID=$r.ShadowID; DeviceObject=$d} "
            "| ConvertTo-Json -Compress\n")


def delete_script(shadow_id: str) -> str:
    if not _GUID.match(shadow_id):
        raise SnapshotError(f"not a shadow copy ID: {shadow_id!r}")
    return ("$ErrorActionPreference = 'Stop'\n"
            f"Get-CimInstance -ClassName Win32_ShadowCopy -Filter \"ID='{shadow_id}'\" | Remove-CimInstance\n")


def parse_create(out: str) -> tuple[str, str]:
    """(shadow ID, device object) from create_script's output."""
    try:
        obj = json.loads(out.strip().splitlines()[-1])
        code = int(obj["ReturnValue"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise SnapshotError(f"cannot read the shadow copy result: {out[:200]!r}") from exc
    if code != 0:
        raise SnapshotError(f"Win32_ShadowCopy.Create failed ({code}): {CREATE_ERRORS.get(code, 'unknown code')}")
    sid, dev = obj.get("ShadowID") or "", obj.get("DeviceObject") or ""
    if not _GUID.match(sid) or not _DEVICE.match(dev):
        raise SnapshotError(f"unexpected shadow copy result: {out[:200]!r}")
    return sid, dev


class VssSnapshotter:
    kind = "vss"

    def __init__(self, runner: Runner = run_command) -> None:
        self.run = runner

    def create(self, path: str) -> SnapshotHandle:
        volume, rest = volume_of(path)
        sid, device = parse_create(self.run(POWERSHELL, input=create_script(volume)))
        inside = device + "\\" + rest if rest else device + "\\"
        return SnapshotHandle("vss", device + "\\", inside, path, ident=sid)

    def remove(self, handle: SnapshotHandle) -> None:
        self.run(POWERSHELL, input=delete_script(handle.ident))
