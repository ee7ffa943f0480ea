"""The secure lab on the kernel path, inside the distribution-kernel VM (`make test-kernel`):
Mininet on the OVS kernel datapath (with a netem link), Ryu, and terminals/proxy keyed through
SIP into kernel XFRM ESP SAs. The same `Lab` code as on the host chooses these from its probe.

Kernel-path essentials only (the VM runs under TCG, slowly): the probe's choice, Fig 1's four
SAs per side in each host's SAD with SIP ESP-only on the wire, a short Fig 2 call whose RTP is
ESP-only and decrypts with the run's esp_sa file, and nothing left behind (media SAs after BYE,
XFRM state/policy and OVS bridges after teardown).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from experiments.analysis import rtp_loss
from experiments.capabilities import probe
from experiments.control import NodeControl
from experiments.lab import Lab, wait_until
from experiments.pcaps import tshark_fields
from nodes.ipsec.esp_sa import tshark_args
from topologies.m2m import M2M_NETWORKS, address

pytestmark = pytest.mark.vm

PROXY = address("proxy", "core")
A1, B1 = address("a1", "wlan"), address("b1", "netb")
CONFIG = {
    "domain": "m2m.example",
    "users": {"alice": {"terminals": {"a1": ["audio"]}},
              "bob": {"terminals": {"b1": ["audio"]}}},
    "friends": [["alice", "bob"]],
    "servers": {"proxy": PROXY, "sms": address("sms", "core"),
                "presence": address("presence", "core")},
}
NETB_DELAY = "5ms"  # a netem link: proves the lab honours delay on this kernel
T1 = 0.5  # SIP T1 (s): TCG emulation is slow; Timer F is 64*T1
SA_RE = re.compile(r"^src (\S+) dst (\S+)\s*\n\s*proto esp spi (0x[0-9a-f]+)", re.M)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, OVS, XFRM)"
    caps = probe()
    if not caps.esp:
        return (f"the kernel {caps.kernel} has no ESP: the kernel-path lab runs in the "
                "distribution-kernel VM, `make test-kernel`")
    if not caps.ovs_kernel_datapath:
        return f"the kernel {caps.kernel} has no OVS kernel datapath"
    return None


def _run_dir() -> Path | None:
    """In the VM only the run folder is writable: the lab's captures go there."""
    base = os.environ.get("SMIG_VM_RUN_DIR")
    if not base:
        return None  # a host kernel with ESP: the lab's usual captures/ folder
    run = Path(base) / "lab"
    for sub in ("logs", "pcaps", "events"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    return run


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # Checked here, not only in conftest's autouse fixture: module fixtures are set up first.
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    # Unix sockets cannot live on the VM's shared run folder (9p): control sockets go to /tmp.
    ctl_dir = Path(tempfile.mkdtemp(prefix="smig-ctl-"))
    try:
        with Lab(name="test-lab-kernel", run_dir=_run_dir(), ctl_dir=ctl_dir,
                 links={"netb": {"delay": NETB_DELAY}}) as lab:
            assert lab.run_dir is not None
            config = lab.run_dir / "lab.json"
            config.write_text(json.dumps(CONFIG))
            lab.start_proxy(config=config, t1=T1)
            for name in ("a1", "b1"):
                lab.start_terminal(name, config=config, t1=T1)
            yield lab
    finally:
        shutil.rmtree(ctl_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def registered(lab: Lab) -> None:
    for name in ("a1", "b1"):
        assert node(lab, name)("register")["status"] == 200


def node(lab: Lab, name: str) -> NodeControl:
    return lab.nodes[name]


def xfrm(lab: Lab, host: str, what: str) -> str:
    """`ip xfrm <what>` in a Mininet host's namespace (its kernel SAD/SPD)."""
    return lab.host(host).cmd(f"ip xfrm {what}")


def kernel_sas(lab: Lab, host: str) -> list[tuple[str, str, int]]:
    """(src, dst, spi) of every ESP SA in `host`'s kernel SAD."""
    return [(m[1], m[2], int(m[3], 16)) for m in SA_RE.finditer(xfrm(lab, host, "state"))]


def kernel_policies(lab: Lab, host: str) -> list[str]:
    """One `dir ...` line per policy (iproute2 prints the selector on the line above)."""
    return [line for line in xfrm(lab, host, "policy").splitlines()
            if line.strip().startswith("dir ")]


def test_probe_chose_the_kernel_paths(lab: Lab) -> None:
    assert lab.caps is not None and lab.run_dir is not None
    assert (lab.caps.ovs_datapath, lab.caps.ipsec_backend) == ("kernel", "kernel"), lab.caps
    assert lab.caps.esp and lab.caps.netem and lab.caps.ovs_kernel_datapath
    recorded = json.loads((lab.run_dir / "capabilities.json").read_text())
    assert (recorded["ovs_datapath"], recorded["ipsec_backend"]) == ("kernel", "kernel")
    assert recorded["netem"] is True
    # The bridges really are in the kernel datapath, and the netem delay is on the link.
    for br in M2M_NETWORKS:
        kind = subprocess.run(["ovs-vsctl", "get", "bridge", br, "datapath_type"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert kind in ('""', "system"), (br, kind)
    dps = subprocess.run(["ovs-dpctl", "show"], capture_output=True, text=True,
                         check=True).stdout
    assert "system@ovs-system" in dps and "b1-netb" not in dps and "netb-b1" in dps, dps
    qdisc = lab.host("b1").cmd("tc qdisc show dev b1-netb")
    assert "qdisc netem" in qdisc and f"delay {NETB_DELAY}" in qdisc, qdisc


def test_registration_puts_four_sas_each_side_in_the_kernel(lab: Lab, registered: None) -> None:
    proxy_sas = kernel_sas(lab, "proxy")
    for name, ip in (("a1", A1), ("b1", B1)):
        status = node(lab, name)("status")["ipsec"]
        mine = kernel_sas(lab, name)
        assert len(mine) == 4, xfrm(lab, name, "state")
        assert {spi for _, _, spi in mine} == {sa["spi"] for sa in status["sas"]}
        assert all(ip in (src, dst) and PROXY in (src, dst) for src, dst, _ in mine), mine
        assert len(kernel_policies(lab, name)) == 4, xfrm(lab, name, "policy")
        theirs = [sa for sa in proxy_sas if ip in sa[:2]]
        assert sorted(theirs) == sorted(mine), (theirs, mine)


def test_sip_between_terminal_and_proxy_is_esp_only(lab: Lab, registered: None) -> None:
    assert lab.run_dir is not None
    assert node(lab, "a1")("message", to="b1", text="over kernel ESP")["status"] == 200
    wait_until(lambda: node(lab, "b1")("status")["messages"], 20, "b1 to get the MESSAGE")
    rows = tshark_fields(
        lab.pcaps["a1-wlan"], f"ip.addr=={PROXY} && ip.addr=={A1}",
        ["esp.spi", "udp.srcport", "udp.dstport", "sip.Method", "sip.Status-Code",
         "sip.CSeq.method"], tshark_args(lab.run_dir / "esp_sa"))
    plain = [r for r in rows if not r[0]]
    esp = [r for r in rows if r[0]]
    # Only Fig 1's first REGISTER and its 401 are plaintext, on port 5060; nothing else.
    assert plain, "the unprotected REGISTER/401 exchange should be visible"
    assert all("5060" in (r[1], r[2]) and (r[3] == "REGISTER" or r[4] == "401")
               for r in plain), plain
    # The rest is ESP, and the run's esp_sa file decrypts it to SIP (the MESSAGE among it).
    assert esp and any("MESSAGE" in r[5] for r in esp), esp


def test_secure_call_rtp_is_esp_only_and_decrypts(lab: Lab, registered: None) -> None:
    assert lab.run_dir is not None
    a1, b1 = node(lab, "a1"), node(lab, "b1")
    call = a1("call", to="b1")
    assert call["status"] == 200, call
    cid = call["call_id"]
    for name in ("a1", "b1"):  # two media SAs (one per direction) joined each side's four
        wait_until(lambda n=name: len(kernel_sas(lab, n)) == 6, 20, f"{name}'s media SAs")
    media = a1("status")["calls"][cid]["media"]
    port = int(b1("status")["calls"][cid]["media"]["local"].split(":")[1])

    def received() -> int:
        return b1("status")["calls"][cid]["media"]["rx"]["received"]

    wait_until(lambda: received() >= 100, 30, "b1 to receive 2 s of RTP")  # 50 packets/s
    assert a1("hangup", call_id=cid)["status"] == 200
    # After BYE no media SA (or policy) remains on either side: the four registration ones.
    for name in ("a1", "b1"):
        wait_until(lambda n=name: len(kernel_sas(lab, n)) == 4, 20, f"{name}'s media SAs to go")
        assert len(kernel_policies(lab, name)) == 4, xfrm(lab, name, "policy")
    # a1 <-> b1 on the wire: ESP only, and it decrypts to RTP with consecutive sequence numbers.
    rows = tshark_fields(
        lab.pcaps["b1-netb"], f"ip.addr=={A1} && ip.addr=={B1}",
        ["esp.spi", "ip.src", "udp.dstport", "rtp.seq"],
        [*tshark_args(lab.run_dir / "esp_sa"), "-d", f"udp.port=={port},rtp"])
    assert rows and all(r[0] for r in rows), [r for r in rows if not r[0]][:5]
    from_a1 = [r for r in rows if r[1] == A1]
    assert {int(r[0], 16) for r in from_a1} == {media["spi_out"]}
    rtp = [r for r in from_a1 if r[2] == str(port)]
    seqs = [int(r[3]) for r in rtp if r[3]]
    assert len(seqs) == len(rtp) >= 100, "every ESP packet to the RTP port decrypts to RTP"
    # Consecutive: no hole and no duplicate between the first and the last (two packets may
    # swap places on a busy machine's path: the capture shows them in arrival order).
    loss = rtp_loss((0, seq) for seq in seqs)
    assert (loss["lost"], loss["duplicates"]) == (0, 0), loss


def _names(cmd: list[str]) -> set[str]:
    return set(subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.split())


def test_nothing_left_after_teardown(lab: Lab, registered: None) -> None:
    # The node processes remove their SAs and policies when stopped (SIGTERM)...
    procs: dict[str, Any] = {p.name: p for p in lab.procs}
    for name in ("a1", "b1", "proxy"):
        procs[name].stop()
        assert kernel_sas(lab, name) == [], xfrm(lab, name, "state")
        assert kernel_policies(lab, name) == [], xfrm(lab, name, "policy")
    # ...and the lab removes its bridges (and with the hosts, their namespaces).
    lab.stop()
    assert _names(["ovs-vsctl", "--timeout=5", "list-br"]) & set(M2M_NETWORKS) == set()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert not [n for n in M2M_NETWORKS if re.search(rf": {n}[:@]", links)], links
    assert subprocess.run(["ip", "xfrm", "state"], capture_output=True, text=True,
                          check=True).stdout.strip() == ""
