"""Capability probe: what this kernel and machine offer the lab, printed and recorded per run.

Finds out (never assumes) whether the kernel has ESP (an SA in a scratch namespace), netem
and the Open vSwitch kernel datapath, and chooses accordingly: the OVS datapath (kernel, else
userspace), the IPsec backend (kernel XFRM, else userspace ESP) and which link features work.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


def _run(*cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _scratch_netns(test: str) -> bool:
    """Run `test` (a shell snippet, $NS = namespace) in a throwaway namespace."""
    ns = f"smig-probe-{uuid.uuid4().hex[:8]}"
    if _run("ip", "netns", "add", ns).returncode != 0:
        return False
    try:
        return _run("sh", "-c", test.replace("$NS", ns)).returncode == 0
    finally:
        _run("ip", "netns", "del", ns)


def probe_esp() -> bool:
    """An ESP SA can be added in a scratch namespace (kernel XFRM with esp4)."""
    try:
        from nodes.ipsec.probe import kernel_has_esp
    except ImportError:  # the netlink probe is not there: ask iproute2 instead
        return _scratch_netns(
            "ip -n $NS xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x1000 "
            "mode transport enc 'cbc(aes)' 0x000102030405060708090a0b0c0d0e0f "
            "auth-trunc 'hmac(sha256)' "
            "0x000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f 128"
        )
    try:
        return bool(kernel_has_esp())
    except Exception as exc:  # a probe must not take the lab down; say what happened
        print(f"capability probe: ESP probe failed ({exc!r}); assuming no kernel ESP")
        return False


def probe_netem() -> bool:
    return _scratch_netns(
        "ip -n $NS link add smigd0 type dummy && "
        "tc -n $NS qdisc add dev smigd0 root netem delay 1ms"
    )


def probe_ovs_kernel() -> bool:
    """The openvswitch kernel module answers on generic netlink (ovs_datapath family)."""
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    _run("modprobe", "-q", "openvswitch")
    sock = GenericNetlinkSocket()
    try:
        sock.discovery("ovs_datapath")
        return True
    except NetlinkError:
        return False
    finally:
        sock.close()


def _version(*cmd: str) -> str:
    try:
        out = _run(*cmd, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


@dataclass
class Capabilities:
    kernel: str
    esp: bool
    netem: bool
    ovs_kernel_datapath: bool
    ovs_datapath: str = ""  # "kernel" or "user" (Mininet's OVSSwitch datapath= value)
    ipsec_backend: str = ""  # "kernel" or "userspace"
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    # Set (e.g. "TCG") when the lab runs inside an emulated VM: timings are then not
    # comparable with a real machine's, only with each other (`make vm-experiment`).
    emulation: str | None = field(default_factory=lambda: os.environ.get("SMIG_EMULATION"))

    def __post_init__(self) -> None:
        self.ovs_datapath = "kernel" if self.ovs_kernel_datapath else "user"
        forced = os.environ.get("SMIG_IPSEC_BACKEND", "").strip()
        if forced:
            if forced not in ("kernel", "userspace"):
                raise ValueError(
                    f"SMIG_IPSEC_BACKEND={forced!r}: expected 'kernel' or 'userspace'"
                )
            if forced == "kernel" and not self.esp:
                raise ValueError("SMIG_IPSEC_BACKEND=kernel, but this kernel has no ESP")
            self.ipsec_backend = forced
            self.notes.append(f"IPsec backend forced to {forced} by SMIG_IPSEC_BACKEND")
        else:
            self.ipsec_backend = "kernel" if self.esp else "userspace"
        if not self.esp:
            self.notes.append("kernel has no ESP: IPsec runs in the userspace ESP engine (TUN)")
        if not self.netem:
            self.notes.append(
                "kernel has no netem: link delay, jitter and loss are disabled "
                "(bandwidth limits still apply); runs continue without them"
            )
        if not self.ovs_kernel_datapath:
            self.notes.append("no OVS kernel datapath: switches use the userspace datapath")
        if self.emulation:
            self.notes.append(f"timings taken under emulation ({self.emulation}): compare "
                              "methods with each other, not with a real machine")

    def summary(self) -> str:
        yes = {True: "yes", False: "no"}
        lines = [
            f"kernel {self.kernel}: ESP {yes[self.esp]}, netem {yes[self.netem]}, "
            f"OVS kernel datapath {yes[self.ovs_kernel_datapath]}",
            f"using: OVS datapath {self.ovs_datapath}, IPsec backend {self.ipsec_backend}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def software_versions() -> dict[str, str]:
    import mininet.net

    versions = {
        "python": platform.python_version(),
        "mininet": mininet.net.VERSION,
        "ovs": _version("ovs-vsctl", "--version"),
        "tshark": _version("tshark", "--version"),
        "tcpdump": _version("tcpdump", "--version"),
    }
    try:
        from importlib.metadata import version

        versions["ryu"] = version("ryu")
        versions["pyroute2"] = version("pyroute2")
        versions["cryptography"] = version("cryptography")
    except Exception as exc:  # metadata missing is worth a note, not a failure
        versions["python-packages"] = f"unknown ({exc})"
    return versions


_cached: Capabilities | None = None


def probe(refresh: bool = False) -> Capabilities:
    """Probe once per process (each probe makes and removes a scratch namespace)."""
    global _cached
    if _cached is None or refresh:
        _cached = Capabilities(
            kernel=platform.release(),
            esp=probe_esp(),
            netem=probe_netem(),
            ovs_kernel_datapath=probe_ovs_kernel(),
            versions=software_versions(),
        )
    return _cached


if __name__ == "__main__":
    caps = probe()
    print(caps.summary())
    print(json.dumps(caps.to_dict(), indent=2))
