"""Lab tests of the userspace ESP backend: two namespaces joined by a veth pair, each running
tests/ipsec/esp_peer.py (a UserspaceBackend in a subprocess), UDP both ways through ESP.

Checks: only ESP on the wire (tcpdump), tshark decrypts it with the esp_sa file the backends
wrote, a replayed and a tampered packet (resent with scapy) are dropped and counted, plaintext
that an IN policy covers is dropped and counted, an SA pair moved to new addresses keeps
working, and after exit or SIGTERM nothing (TUN, nft table, ip rule, process) is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes.ipsec.esp_sa import tshark_args

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)"),
]

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / "tests" / "ipsec" / "esp_peer.py"
A1, B1 = "10.99.41.1", "10.99.41.2"
A2, B2 = "10.99.42.1", "10.99.42.2"  # the addresses the SA pair moves to
ENC_KEY, AUTH_KEY = os.urandom(16).hex(), os.urandom(32).hex()


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Peer:
    """One esp_peer.py subprocess in a namespace, spoken to over JSON lines."""

    def __init__(self, ns: str, esp_sa: Path) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(PEER), str(esp_sa)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout is not None
        hello = json.loads(self.proc.stdout.readline())
        self.tun, self.table, self.mark = hello["tun"], hello["table"], hello["mark"]

    def __call__(self, op: str, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **req}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        assert answer["ok"], answer
        return answer

    def counters(self) -> dict[str, int]:
        return self("counters")["counters"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def leftovers(self) -> list[str]:
        """What this peer's backend installed that still exists in its namespace."""
        found = []
        if self.tun in sh("ip", "-n", self.ns, "link", "show"):
            found.append(f"TUN {self.tun}")
        if self.table in sh("ip", "netns", "exec", self.ns, "nft", "list", "tables"):
            found.append(f"nft table {self.table}")
        if f"{self.mark:#x}" in sh("ip", "-n", self.ns, "rule", "show"):
            found.append("ip rule")
        if self.proc.poll() is None:
            found.append(f"process {self.proc.pid}")
        return found


SHA1_KEY = os.urandom(20).hex()
ALGS = [("aes-cbc", "hmac-sha-256-128"), ("null", "hmac-sha-1-96")]


def sa(src: str, dst: str, spi: int, algs: tuple[str, str] = ALGS[0]) -> dict[str, Any]:
    enc, auth = algs
    return {"src": src, "dst": dst, "spi": spi, "enc_alg": enc,
            "enc_key": ENC_KEY if enc == "aes-cbc" else "", "auth_alg": auth,
            "auth_key": AUTH_KEY if auth == "hmac-sha-256-128" else SHA1_KEY}


def sel(src: str, dst: str, sport: int, dport: int) -> dict[str, Any]:
    return {"src": src, "dst": dst, "proto": 17, "sport": sport, "dport": dport}


def protect(a: Peer, b: Peer, a_ip: str, b_ip: str, algs: tuple[str, str] = ALGS[0]) -> None:
    """SPI 0x1001 for a->b, 0x2001 for b->a; UDP 5000 (a) <-> 6000 (b), both directions."""
    for peer in (a, b):
        if peer("get_sa", dst=b_ip, spi=0x1001)["sa"] is None:
            peer("add_sa", sa=sa(a_ip, b_ip, 0x1001, algs))
            peer("add_sa", sa=sa(b_ip, a_ip, 0x2001, algs))
    ab, ba = sel(a_ip, b_ip, 5000, 6000), sel(b_ip, a_ip, 6000, 5000)
    a("add_policy", policy={"selector": ab, "direction": "out", "tmpl_src": a_ip,
                            "tmpl_dst": b_ip})
    a("add_policy", policy={"selector": ba, "direction": "in", "tmpl_src": b_ip,
                            "tmpl_dst": a_ip})
    b("add_policy", policy={"selector": ba, "direction": "out", "tmpl_src": b_ip,
                            "tmpl_dst": a_ip})
    b("add_policy", policy={"selector": ab, "direction": "in", "tmpl_src": a_ip,
                            "tmpl_dst": b_ip})


def unprotect(a: Peer, b: Peer, a_ip: str, b_ip: str) -> None:
    ab, ba = sel(a_ip, b_ip, 5000, 6000), sel(b_ip, a_ip, 6000, 5000)
    for peer in (a, b):
        for selector in (ab, ba):
            for direction in ("in", "out"):
                peer("delete_policy", selector=selector, direction=direction)


def exchange(a: Peer, b: Peer, a_ip: str, b_ip: str, text: str) -> None:
    a("send", sport=5000, dst=b_ip, dport=6000, data=f"{text} a->b")
    got = b("recv", port=6000, timeout=5)
    assert got["data"] == f"{text} a->b" and got["from"] == [a_ip, 5000]
    b("send", sport=6000, dst=a_ip, dport=5000, data=f"{text} b->a")
    got = a("recv", port=5000, timeout=5)
    assert got["data"] == f"{text} b->a" and got["from"] == [b_ip, 6000]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Peer, Peer, Path]]:
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"smesp{tag}a", f"smesp{tag}b"
    peers: list[Peer] = []
    try:
        sh("ip", "netns", "add", ns_a)
        sh("ip", "netns", "add", ns_b)
        sh("ip", "link", "add", "esplabA", "netns", ns_a, "type", "veth", "peer", "name",
           "esplabB", "netns", ns_b)
        for ns, dev, ips in ((ns_a, "esplabA", (A1, A2)), (ns_b, "esplabB", (B1, B2))):
            for ip in ips:
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        esp_sa = tmp_path / "esp_sa"
        peers += [Peer(ns_a, esp_sa), Peer(ns_b, esp_sa)]
        yield peers[0], peers[1], esp_sa
    finally:
        for peer in peers:
            peer.kill()
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "del", ns, check=False)


def tshark(pcap: Path, *args: str) -> list[str]:
    out = sh("tshark", "-r", str(pcap), *args)
    return [line for line in out.splitlines() if line]


class Capture:
    """tcpdump on a namespace's interface into a pcap (our own process, stopped by pid)."""

    def __init__(self, ns: str, dev: str, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "--immediate-mode", "-U", "-n",
             "-w", str(path), "ip"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on ..." once the socket is open
        assert "listening" in line, line

    def wait_frames(self, count: int) -> None:
        """Poll until `count` frames are in the file (-U writes each one as it comes)."""
        def frames() -> int:  # the last frame may be half-written: no check
            return len(sh("tshark", "-r", str(self.path), check=False).splitlines())

        wait_for(lambda: frames() >= count, what=f"{count} captured frames")

    def stop(self) -> Path:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        return self.path




@pytest.mark.skipif(shutil.which("tshark") is None or shutil.which("tcpdump") is None,
                    reason="needs tcpdump and tshark")
@pytest.mark.parametrize("algs", ALGS, ids=["aes-sha256", "null-sha1"])
def test_udp_both_ways_only_esp_on_wire_tshark_decrypts(lab: tuple[Peer, Peer, Path],
                                                        tmp_path: Path,
                                                        algs: tuple[str, str]) -> None:
    a, b, esp_sa = lab
    b("bind", port=6000)
    a("bind", port=5000)
    protect(a, b, A1, B1, algs)
    cap = Capture(b.ns, "esplabB", tmp_path / "wire.pcap")
    exchange(a, b, A1, B1, "first")
    exchange(a, b, A1, B1, "second")
    cap.wait_frames(4)
    pcap = cap.stop()
    # On the wire: 4 ESP packets, no plaintext UDP.
    assert tshark(pcap, "-Y", "udp") == []
    assert tshark(pcap, "-Y", "esp", "-T", "fields", "-e", "esp.spi", "-e", "esp.sequence") == [
        "0x00001001\t1", "0x00002001\t1", "0x00001001\t2", "0x00002001\t2"]
    # tshark with the esp_sa file both backends wrote: decrypted, ICVs verified.
    rows = tshark(pcap, *tshark_args(esp_sa), "-Y", "udp", "-T", "fields",
                  "-e", "udp.srcport", "-e", "udp.payload", "-e", "esp.icv_good")
    assert rows == [
        f"5000\t{b'first a->b'.hex()}\t1", f"6000\t{b'first b->a'.hex()}\t1",
        f"5000\t{b'second a->b'.hex()}\t1", f"6000\t{b'second b->a'.hex()}\t1"]
    assert a.counters()["packets_out"] == 2 and b.counters()["packets_in"] == 2
    assert b("get_sa", dst=B1, spi=0x1001)["sa"]["replay_top"] == 2


def _resend(ns: str, pcap: Path, seq: int | None = None) -> None:
    """With scapy, in namespace `ns`: resend the first ESP packet of `pcap` as captured, or
    with its sequence number rewritten to `seq` (the ICV then no longer matches)."""
    code = (
        "import sys, struct\n"
        "from scapy.all import IP, rdpcap, send\n"
        "pkt = next(p[IP] for p in rdpcap(sys.argv[1]) if IP in p and p[IP].proto == 50)\n"
        "raw = bytearray(bytes(pkt))\n"
        "if sys.argv[2] != '-': raw[24:28] = struct.pack('!I', int(sys.argv[2]))\n"
        "send(IP(bytes(raw)), verbose=False)\n"
    )
    sh("ip", "netns", "exec", ns, sys.executable, "-c", code, str(pcap),
       "-" if seq is None else str(seq))


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_replay_tamper_and_plaintext_are_dropped_and_counted(lab: tuple[Peer, Peer, Path],
                                                             tmp_path: Path) -> None:
    a, b, _ = lab
    b("bind", port=6000)
    protect(a, b, A1, B1)
    cap = Capture(b.ns, "esplabB", tmp_path / "one.pcap")
    a("send", sport=5000, dst=B1, dport=6000, data="original")
    assert b("recv", port=6000)["data"] == "original"
    cap.wait_frames(1)
    pcap = cap.stop()

    _resend(a.ns, pcap)
    wait_for(lambda: b.counters()["replay_dropped"] == 1, what="replay counted")
    # Tampered: seq 100 is new to the window, so the packet reaches (and fails) the ICV check.
    _resend(a.ns, pcap, seq=100)
    wait_for(lambda: b.counters()["integrity_failed"] == 1, what="tamper counted")
    assert b("get_sa", dst=B1, spi=0x1001)["sa"]["replay_top"] == 1  # window did not move
    assert b("recv", port=6000, timeout=0.5)["data"] is None  # neither got through

    # Plaintext on a port an IN policy protects is dropped by B (A sends it unprotected).
    a("delete_policy", selector=sel(A1, B1, 5000, 6000), direction="out")
    a("send", sport=5000, dst=B1, dport=6000, data="plaintext")
    wait_for(lambda: b.counters()["policy_dropped"] == 1, what="plaintext drop counted")
    assert b("recv", port=6000, timeout=0.5)["data"] is None
    counters = b.counters()
    assert counters["packets_in"] == 1 and counters["no_sa"] == 0


@pytest.mark.parametrize("op", ["move_sa", "replace_sa"])
def test_moved_sa_pair_keeps_traffic_flowing(lab: tuple[Peer, Peer, Path], op: str) -> None:
    """move_sa: the backend's atomic move; replace_sa: get_sa + moved() + add_sa + delete_sa."""
    a, b, _ = lab
    a("bind", port=5000)
    b("bind", port=6000)
    protect(a, b, A1, B1)
    exchange(a, b, A1, B1, "before")
    unprotect(a, b, A1, B1)
    for peer in (a, b):
        peer(op, dst=B1, spi=0x1001, new_src=A2, new_dst=B2)
        peer(op, dst=A1, spi=0x2001, new_src=B2, new_dst=A2)
    protect(a, b, A2, B2)
    exchange(a, b, A2, B2, "after")
    # Same SPIs, sequence numbers went on from the pre-move SA.
    assert a("get_sa", dst=B2, spi=0x1001)["sa"]["seq"] == 2
    assert b("get_sa", dst=B2, spi=0x1001)["sa"]["replay_top"] == 2
    assert a("get_sa", dst=B1, spi=0x1001)["sa"] is None


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_nothing_left_after_exit(lab: tuple[Peer, Peer, Path], how: str) -> None:
    a, b, _ = lab
    protect(a, b, A1, B1)
    assert a.leftovers() == [f"TUN {a.tun}", f"nft table {a.table}", "ip rule",
                             f"process {a.proc.pid}"]
    for peer in (a, b):
        if how == "exit":
            peer("exit")
        else:
            peer.proc.send_signal(signal.SIGTERM)
        peer.proc.wait(10)
        assert peer.leftovers() == []
    assert b.proc.returncode == (0 if how == "exit" else 128 + signal.SIGTERM)


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_large_datagram_crosses_as_fragmented_esp(lab: tuple[Peer, Peer, Path],
                                                  tmp_path: Path) -> None:
    """Bigger than the veth MTU after ESP: the ESP packet (not the inner datagram) is
    fragmented, as Linux XFRM does in transport mode; the receiver reassembles, then decrypts."""
    a, b, _ = lab
    b("bind", port=6000)
    protect(a, b, A1, B1)
    cap = Capture(b.ns, "esplabB", tmp_path / "big.pcap")
    big = "".join(chr(65 + i % 26) for i in range(3000))
    a("send", sport=5000, dst=B1, dport=6000, data=big)
    assert b("recv", port=6000)["data"] == big
    cap.wait_frames(3)
    pcap = cap.stop()
    assert tshark(pcap, "-Y", "udp") == []
    frags = tshark(pcap, "-T", "fields", "-e", "ip.proto", "-e", "ip.flags.mf")
    assert frags == ["50\t1", "50\t1", "50\t0"]
    assert b.counters()["packets_in"] == 1
