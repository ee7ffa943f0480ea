#!/usr/bin/env bash
# One idempotent set-up step behind `make test`, `make experiment`, `make lab`:
# Debian packages, the venv with pinned Python dependencies, and Open vSwitch running.
# Usage: scripts/setup.sh [base|vm]    (vm adds the packages for the kernel-path VM)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ "$(id -u)" != 0 ]; then
  echo "smig-lab: set-up needs root (network namespaces, OVS, XFRM): run with sudo" >&2
  exit 1
fi

base_pkgs=(mininet openvswitch-switch tshark tcpdump iputils-ping iproute2 python3-venv
           python3-pip sip-tester kamailio espeak-ng sox procps psmisc ethtool nftables
           python3-nftables)
vm_pkgs=(qemu-system-x86 linux-image-amd64 busybox-static)
pkgs=("${base_pkgs[@]}")
[ "${1:-base}" = vm ] && pkgs+=("${vm_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "smig-lab: missing packages (${missing[*]}) and no apt-get: install them by hand (see README)" >&2
    exit 1
  fi
  echo "smig-lab: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; answer once, non-interactively.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv: Debian's python (not pyenv's), with system site packages for mininet.
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "smig-lab: building .venv from requirements.txt"
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi

# Open vSwitch: a system service; start it if it is not answering.
if ! ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
  echo "smig-lab: starting Open vSwitch"
  /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >/dev/null 2>&1 || true
  ovs-vsctl --timeout=10 show >/dev/null || { echo "smig-lab: Open vSwitch did not start" >&2; exit 1; }
fi
