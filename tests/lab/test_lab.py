"""The lab boots, routes, captures, and the controller's faults act on the data path.

One lab for the whole module (booting is the slow part); faults are restored in `finally`.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from experiments.faults import ControllerError, FaultClient
from experiments.lab import Lab, read_jsonl, wait_until
from experiments.pcaps import packet_times
from topologies.m2m import M2M_HOSTS, address

pytestmark = pytest.mark.lab


class Probe:
    def __init__(self, lab: Lab, a1_log: Path, b1_log: Path) -> None:
        self.lab, self.a1_log, self.b1_log = lab, a1_log, b1_log

    def arrivals(self, path: str) -> list[int]:
        """Wall-clock arrival times (ns) at B1 of the probe stream sent over `path`."""
        return [r["t_ns"] for r in read_jsonl(self.b1_log)
                if r.get("event") == "rx" and r.get("path") == path]

    def wait_flowing(self, path: str, since_ns: int, count: int = 10) -> None:
        wait_until(lambda: sum(t > since_ns for t in self.arrivals(path)) >= count, 20,
                   f"{count} probe packets over {path}")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(name="test-lab") as lab:
        yield lab


@pytest.fixture(scope="module")
def probe(lab: Lab) -> Probe:
    a1_log, b1_log = lab.start_probe(rate=100)
    p = Probe(lab, a1_log, b1_log)
    p.wait_flowing("wlan", 0)
    p.wait_flowing("lte", 0)
    return p


def carrier(lab: Lab, host: str, intf: str) -> str:
    return lab.host(host).cmd(f"cat /sys/class/net/{intf}/carrier").strip()


@pytest.mark.parametrize("src_net", ["wlan", "lte"])
@pytest.mark.parametrize("dst", ["proxy", "sms", "presence", "b1"])
def test_a1_reaches_servers_and_b1_over_each_interface(lab: Lab, src_net: str, dst: str) -> None:
    src = address("a1", src_net)
    dst_ip = address(dst, M2M_HOSTS[dst][0][0])
    out = lab.host("a1").cmd(f"ping -c 2 -W 2 -I {src} {dst_ip}")
    assert " 0% packet loss" in out, out
    # The reply came back to the address we sent from: source routing holds.
    assert f"from {dst_ip}" in out


def _fault_window(
    lab: Lab, probe: Probe, faults: FaultClient, kind: str, hold: float = 1.5
) -> tuple[int, int]:
    """Inject `kind` on A1's wlan access port for `hold` s; returns (inject, restore) ns."""
    fault = faults.inject("wlan", "wlan-a1", kind)
    t_inject = fault["t_ns"]
    time.sleep(hold)
    expected_carrier = "0" if kind == "down" else "1"
    assert carrier(lab, "a1", "a1-wlan") == expected_carrier
    restored = faults.restore(fault["id"])
    assert restored["id"] == fault["id"]
    t_restore = time.time_ns()
    return t_inject, t_restore


@pytest.mark.parametrize("kind", ["down", "blackhole"])
def test_fault_stops_wlan_only_and_restore_brings_it_back(
    lab: Lab, probe: Probe, faults: FaultClient, kind: str
) -> None:
    probe.wait_flowing("wlan", time.time_ns())
    t_inject, t_restore = _fault_window(lab, probe, faults, kind)
    probe.wait_flowing("wlan", t_restore)  # restore brings the path back
    # Quiet window: skip the first 200 ms (packets already in flight when the fault landed).
    lo, hi = t_inject + 200_000_000, t_restore
    wlan = [t for t in probe.arrivals("wlan") if lo < t < hi]
    lte = [t for t in probe.arrivals("lte") if lo < t < hi]
    assert wlan == [], f"{len(wlan)} wlan probes arrived during the {kind} fault"
    assert len(lte) > 50, f"lte carried only {len(lte)} probes during the {kind} fault"
    # The capture at B1 agrees with the receive log.
    pcap = lab.pcaps["b1-netb"]
    wait_until(lambda: packet_times(pcap, f"ip.src=={address('a1', 'wlan')} && udp.dstport==9000"
                                    f" && frame.time_epoch > {t_restore / 1e9}"), 10,
               "wlan probes in the capture after restore")
    wlan_pcap = [t for t in packet_times(pcap, f"ip.src=={address('a1', 'wlan')} && "
                                         "udp.dstport==9000") if lo / 1e9 < t < hi / 1e9]
    lte_pcap = [t for t in packet_times(pcap, f"ip.src=={address('a1', 'lte')} && "
                                        "udp.dstport==9000") if lo / 1e9 < t < hi / 1e9]
    assert wlan_pcap == []
    assert len(lte_pcap) > 50


def test_carrier_back_after_port_restore(lab: Lab, faults: FaultClient) -> None:
    fault = faults.inject("wlan", "wlan-a1", "down")
    wait_until(lambda: carrier(lab, "a1", "a1-wlan") == "0", 10, "carrier loss on a1-wlan")
    faults.restore(fault["id"])
    wait_until(lambda: carrier(lab, "a1", "a1-wlan") == "1", 10, "carrier back on a1-wlan")


def test_pcaps_for_every_host_interface(lab: Lab, probe: Probe) -> None:
    expected = {f"{h}-{net}" for h, ifaces in M2M_HOSTS.items() for net, _ in ifaces}
    expected |= {f"r0-{net}" for net in ("core", "wlan", "lte", "netb")}
    assert expected <= set(lab.pcaps)
    for intf in expected:
        head = lab.pcaps[intf].read_bytes()[:4]
        assert head in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4"), f"{intf}: not a pcap"
    # Every interface on the probe's paths saw probe packets.
    for intf, net in [("a1-wlan", "wlan"), ("r0-wlan", "wlan"), ("a1-lte", "lte"),
                      ("r0-lte", "lte"), ("r0-netb", "wlan"), ("b1-netb", "lte")]:
        flt = f"ip.src=={address('a1', net)} && udp.dstport==9000"
        wait_until(lambda p=lab.pcaps[intf], f=flt: packet_times(p, f), 10,
                   f"probe packets in {intf}.pcap")


def test_fault_events_logged_with_wall_clock(lab: Lab, faults: FaultClient) -> None:
    before = time.time_ns()
    fault = faults.inject("lte", "lte-a1", "blackhole")
    assert before <= fault["t_ns"] <= time.time_ns()
    assert [f["id"] for f in faults.faults()] == [fault["id"]]
    time.sleep(0.05)
    before_restore = time.time_ns()
    faults.restore(fault["id"])
    assert faults.faults() == []
    assert lab.run_dir is not None
    events = list(read_jsonl(lab.run_dir / "events" / "controller.jsonl"))
    kinds = [(e["event"], e.get("id")) for e in events]
    assert ("fault-injected", fault["id"]) in kinds
    assert ("fault-restored", fault["id"]) in kinds
    restored = next(e for e in events if e["event"] == "fault-restored"
                    and e["id"] == fault["id"])
    # t_ns is when the restore happened; the injection time has its own name
    assert before_restore <= restored["t_ns"] <= time.time_ns()
    assert restored["injected_t_ns"] == fault["t_ns"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "text"),
    [
        ("POST", "/lab/faults", {"switch": "nope", "port": 1, "kind": "down"}, 404,
         "unknown switch 'nope'"),
        ("POST", "/lab/faults", {"switch": "wlan", "port": "wlan-zz", "kind": "down"}, 404,
         "switch 'wlan' has no port 'wlan-zz'"),
        ("POST", "/lab/faults", {"switch": "wlan", "port": 99, "kind": "down"}, 404,
         "switch 'wlan' has no port 99"),
        ("POST", "/lab/faults", {"switch": "wlan", "port": "wlan-a1", "kind": "melt"}, 400,
         "unknown fault kind 'melt'"),
        ("POST", "/lab/faults", {"switch": "wlan"}, 400, "missing field(s): port, kind"),
        ("POST", "/lab/faults", [1, 2], 400, "body must be a JSON object"),
        ("POST", "/lab/faults", {"switch": "wlan", "port": True, "kind": "down"}, 400,
         "'port' must be a port name or number"),
        ("POST", "/lab/faults", b"{not json", 400, "body is not valid JSON"),
        ("DELETE", "/lab/faults/12345", None, 404, "no active fault 12345"),
        ("DELETE", "/lab/faults/abc", None, 400, "fault id must be a number, got 'abc'"),
        ("DELETE", "/lab/faults/%B2", None, 400, "fault id must be a number"),  # was 500
        ("DELETE", "/lab/faults/" + "9" * 5000, None, 404, "no active fault 999"),  # was 500
        ("POST", "/lab/faults", {"switch": "wlan", "port": "wlan-a1", "kind": "down", "x": 1},
         400, "unknown field(s): 'x'"),  # was 201
        ("POST", "/lab/faults", b"[" * 1000 + b"]" * 1000, 400,
         "body is not valid JSON: nested deeper than 32 levels"),  # was 500 + traceback
        ("GET", "/lab/nope", None, 404, "no such resource '/lab/nope'"),  # was HTML
        ("PUT", "/lab/faults", {}, 405, "PUT is not allowed on /lab/faults"),  # was HTML 404
    ],
    ids=["unknown-switch", "unknown-port-name", "unknown-port-number", "bad-kind", "missing",
         "array", "bool-port", "bad-json", "no-such-id", "abc-id", "superscript-id",
         "5000-digit-id", "extra-field", "nested", "unknown-route", "put"],
)
def test_rest_errors_are_4xx(
    faults: FaultClient, method: str, path: str, body: object, status: int, text: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    with pytest.raises(ControllerError) as err:
        faults.request(method, path, None if raw else body, raw=raw)
    assert err.value.status == status
    assert text in err.value.message
    assert faults.faults() == []  # nothing injected by a refused request
    assert len(faults.switches()) == 4  # and the controller is still serving


def test_second_fault_on_same_port_is_409(faults: FaultClient) -> None:
    fault = faults.inject("wlan", "wlan-a2", "down")
    with pytest.raises(ControllerError) as err:
        faults.inject("wlan", "wlan-a2", "blackhole")
    assert err.value.status == 409
    assert [f["id"] for f in faults.faults()] == [fault["id"]]


def test_a_deleted_bridge_leaves_the_switch_list(lab: Lab, faults: FaultClient) -> None:
    """A bridge that disconnects is dropped: no ghost in /lab/switches, no 201 for a fault
    injected on it."""
    assert lab.net is not None and lab.caps is not None
    port = lab.net.controllers[0].port
    datapath = "netdev" if lab.caps.ovs_datapath == "user" else "system"
    name = "smigtst0"
    try:
        subprocess.run(["ovs-vsctl", "add-br", name, "--", "set", "bridge", name,
                        "protocols=OpenFlow13", f"datapath_type={datapath}", "--",
                        "set-controller", name, f"tcp:127.0.0.1:{port}", "--",
                        "add-port", name, f"{name}-p1", "--", "set", "interface", f"{name}-p1",
                        "type=internal"], check=True, capture_output=True, timeout=30)
        wait_until(lambda: any(s["name"] == name and s["ports"] for s in faults.switches()),
                   20, f"{name} to connect")
        subprocess.run(["ovs-vsctl", "del-br", name], check=True, capture_output=True,
                       timeout=30)
        wait_until(lambda: all(s["name"] != name for s in faults.switches()), 20,
                   f"{name} to leave the switch list")
        with pytest.raises(ControllerError) as err:
            faults.inject(name, f"{name}-p1", "down")
        assert err.value.status == 404
        assert len(faults.switches()) == 4
    finally:
        subprocess.run(["ovs-vsctl", "--if-exists", "del-br", name], capture_output=True,
                       timeout=30)
