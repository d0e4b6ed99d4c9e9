#!/usr/bin/env bash
# Installs the system tools the tests drive for real: file systems, loop devices, qemu, ACL tools,
# an OpenSSH server (the sftp tests start their own on 127.0.0.1), Graphviz (make docs renders
# docs/architecture.svg), faketime (the S3 clock-skew test runs the client with its clock set
# ahead), and Chromium with a font (the report tests render pages headless).
# Idempotent; installs only what is missing. Without root or apt it says what is missing and
# the tests that need it skip with that reason.
set -euo pipefail
PKGS=(qemu-utils ntfs-3g btrfs-progs lvm2 acl attr xfsprogs e2fsprogs dosfstools rsync
      libnbd-bin nbdkit python3-libnbd util-linux fuse3 fdisk openssh-server graphviz faketime chromium
      fonts-dejavu-core)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-system-deps: missing ${missing[*]} (need root and apt-get); tests that need them will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-system-deps: installed ${missing[*]}"
