"""Pure tests of the lab's small formats: probe packets, fault plans, capability choices."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from experiments.capabilities import Capabilities
from experiments.runner import FaultPlan
from nodes.probe import ProbePacket
from topologies.m2m import M2M_HOSTS, M2MTopo, address


def test_probe_packet_round_trip() -> None:
    pkt = ProbePacket("wlan", 7, 1_796_000_000_123_456_789)
    data = pkt.serialize()
    assert data == (b"SMPR\x01wlan" + b"\0" * 12 + (7).to_bytes(4, "big")
                    + (1_796_000_000_123_456_789).to_bytes(8, "big"))
    assert ProbePacket.parse(data) == pkt
    echo = ProbePacket("lte", 1, 2, echo=True)
    assert ProbePacket.parse(echo.serialize()) == echo


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"SMPR\x01", "probe packet too short: 5 bytes < 33"),
        (b"XXXX\x01" + b"\0" * 28, "not a probe packet: magic b'XXXX'"),
        (b"SMPR\x07" + b"\0" * 28, "probe version 7 not supported"),
        (b"SMPR\x01\xff" + b"\0" * 27, "probe path name is not UTF-8"),
    ],
)
def test_probe_packet_errors(data: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace("[", r"\[")):
        ProbePacket.parse(data)


def test_probe_path_name_too_long() -> None:
    with pytest.raises(ValueError, match="longer than 16 bytes"):
        ProbePacket("x" * 17, 1, 1).serialize()


def test_fault_plan_parse() -> None:
    assert FaultPlan.parse("wlan:wlan-a1:down@3:6") == FaultPlan("wlan", "wlan-a1", "down", 3, 6)
    assert FaultPlan.parse("lte:lte-a1:blackhole@1.5").end is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("wlan:wlan-a1:down", "expected SWITCH:PORT:KIND@START"),
        ("wlan:down@3", "expected SWITCH:PORT:KIND@START"),
        ("wlan:wlan-a1:melt@3", "kind must be down or blackhole"),
        ("wlan:wlan-a1:down@x", "times must be seconds"),
        ("wlan:wlan-a1:down@5:4", "need 0 <= START < END"),
    ],
)
def test_fault_plan_errors(text: str, error: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=error):
        FaultPlan.parse(text)


def _caps(**kw: bool) -> Capabilities:
    return Capabilities(kernel="test", esp=kw.get("esp", False), netem=kw.get("netem", False),
                        ovs_kernel_datapath=kw.get("ovs", False))


def test_capability_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMIG_IPSEC_BACKEND", raising=False)
    bare = _caps()
    assert (bare.ovs_datapath, bare.ipsec_backend) == ("user", "userspace")
    assert any("no netem" in n for n in bare.notes)
    full = _caps(esp=True, netem=True, ovs=True)
    assert (full.ovs_datapath, full.ipsec_backend, full.notes) == ("kernel", "kernel", [])


def test_capability_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMIG_IPSEC_BACKEND", "userspace")
    assert _caps(esp=True).ipsec_backend == "userspace"
    monkeypatch.setenv("SMIG_IPSEC_BACKEND", "kernel")
    with pytest.raises(ValueError, match="this kernel has no ESP"):
        _caps()
    monkeypatch.setenv("SMIG_IPSEC_BACKEND", "xfrm")
    with pytest.raises(ValueError, match="expected 'kernel' or 'userspace'"):
        _caps(esp=True)


def test_topology_shape() -> None:
    topo = M2MTopo()
    assert set(topo.switches()) == {"wlan", "lte", "netb", "core"}
    assert set(topo.hosts()) == set(M2M_HOSTS) | {"r0"}
    a1_links = [(s, d) for s, d in topo.links() if "a1" in (s, d)]
    assert sorted(a1_links) == [("a1", "lte"), ("a1", "wlan")]
    assert address("a1", "lte") == "10.0.2.10"
    with pytest.raises(KeyError, match="no interface on 'lte'"):
        address("b1", "lte")


def test_ovs_not_answering_is_one_clear_lab_error(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "ovs-vsctl"
    fake.write_text("#!/bin/sh\necho 'ovs-vsctl: database connection failed' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    from experiments.lab import LabError, ovs_bridges
    assert ovs_bridges() == set()  # the teardown's listing: nothing to delete
    with pytest.raises(LabError, match=r"Open vSwitch is not answering \(ovs-vsctl: database "
                                       r"connection failed\); start it with 'make setup'"):
        ovs_bridges(check=True)


@pytest.mark.parametrize(
    ("log", "short"),
    [
        ("tcpdump: listening on b1-netb\n155 packets captured\n155 packets received by filter\n"
         "0 packets dropped by kernel\n", None),
        ("116 packets captured\n155 packets received by filter\n0 packets dropped by kernel\n",
         "116 of 155 packets written, 0 dropped by the kernel"),
        ("1 packet captured\n1 packet received by filter\n3 packets dropped by kernel\n",
         "1 of 1 packets written, 3 dropped by the kernel (tcpdump fell behind: the machine "
         "was busy)"),
        ("tcpdump: listening on b1-netb\n", "no closing statistics (tcpdump was killed)"),
    ],
)
def test_capture_shortfall_from_tcpdump_statistics(log: str, short: str | None) -> None:
    from experiments.pcaps import capture_shortfall
    assert capture_shortfall(log) == short


def test_incomplete_captures_from_the_manifest(tmp_path: Path) -> None:
    from experiments.analysis import incomplete_captures
    assert incomplete_captures(tmp_path) == []  # no manifest: nothing to say
    (tmp_path / "manifest.json").write_text('{"incomplete_captures": {"b1-netb": "116 of 155"}}')
    assert incomplete_captures(tmp_path) == ["capture b1-netb is incomplete: 116 of 155"]
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert incomplete_captures(tmp_path) == []
