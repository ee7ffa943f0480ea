"""Helpers for the kernel-VM tests: two namespaces on a veth, UDP, capture, raw frames.

Everything created here is removed by `Pair.close()` (the fixtures call it in `finally`).
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import netns as pyroute2_netns

from nodes.ipsec.api import IPPROTO_UDP, Direction, Policy, SecurityAssociation, Selector

ETH_P_ALL = 0x0003
ENC_KEY = bytes(range(1, 17))
AUTH_KEY = bytes(range(32, 64))


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def run_dir() -> Path:
    """Where a test may leave files (the VM run folder, else a temp dir under .vm/)."""
    path = Path(os.environ.get("SMIG_VM_RUN_DIR", ".vm/local"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Host:
    name: str  # the namespace
    veth: str
    addrs: tuple[str, ...]

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def xfrm_state(self) -> str:
        return self.ip("xfrm", "state")

    def xfrm_policy(self) -> str:
        return self.ip("xfrm", "policy")

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        return pyroute2_netns.create_socket(self.name, family, kind, proto, flags=0)

    def udp(self, addr: str, port: int) -> socket.socket:
        sock = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((addr, port))
        return sock


@dataclass
class Pair:
    """Namespaces a and b joined by a veth; each has 10.0.1.x and 10.0.2.x addresses."""

    a: Host = field(init=False)
    b: Host = field(init=False)

    def __post_init__(self) -> None:
        tag = secrets.token_hex(3)
        self.a = Host(f"xa-{tag}", f"xa{tag}", ("10.0.1.10", "10.0.2.10"))
        self.b = Host(f"xb-{tag}", f"xb{tag}", ("10.0.1.20", "10.0.2.20"))
        try:
            for host in (self.a, self.b):
                pyroute2_netns.create(host.name)
            sh("ip", "link", "add", self.a.veth, "netns", self.a.name, "type", "veth",
               "peer", "name", self.b.veth, "netns", self.b.name)  # fmt: skip
            for host in (self.a, self.b):
                host.ip("link", "set", "lo", "up")
                host.ip("link", "set", host.veth, "up")
                for addr in host.addrs:
                    host.ip("addr", "add", f"{addr}/24", "dev", host.veth)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for host in (self.a, self.b):
            if host.name in pyroute2_netns.listnetns():
                pyroute2_netns.remove(host.name)


def sa(src: str, dst: str, spi: int, sport: int, dport: int, **kw: object) -> SecurityAssociation:
    selector = Selector(src, dst, IPPROTO_UDP, sport, dport)
    return SecurityAssociation(src, dst, spi, "aes-cbc", ENC_KEY, "hmac-sha-256-128", AUTH_KEY,
                               selector=selector, **kw)  # type: ignore[arg-type]  # fmt: skip


def policies(local: str, remote: str, lport: int, rport: int, out_spi: int) -> list[Policy]:
    """The OUT and IN policies of one side for one UDP port pair."""
    return [
        Policy(Selector(local, remote, IPPROTO_UDP, lport, rport), Direction.OUT, local, remote,
               spi=out_spi),
        Policy(Selector(remote, local, IPPROTO_UDP, rport, lport), Direction.IN, remote, local),
    ]  # fmt: skip


def exchange(tx: socket.socket, rx: socket.socket, dst: tuple[str, int], count: int = 3) -> int:
    """Send `count` datagrams tx->rx (resending while ARP or a slow VM catches up); return how
    many distinct ones arrived."""
    rx.setblocking(False)
    got: set[bytes] = set()
    deadline = time.monotonic() + 20
    for i in range(count):
        payload = f"smig-{i}-{secrets.token_hex(4)}".encode()
        while payload not in got and time.monotonic() < deadline:
            tx.sendto(payload, dst)
            ready, _, _ = select.select([rx], [], [], 2.0)
            while ready:
                data, _ = rx.recvfrom(2048)
                got.add(data)
                ready, _, _ = select.select([rx], [], [], 0)
    return len(got)


class Capture:
    """tcpdump on one host's veth into a pcap in the run folder; `lines()` reads it back.
    Immediate mode: otherwise packets still in libpcap's ring when it is stopped are lost."""

    def __init__(self, host: Host, name: str) -> None:
        self.path = run_dir() / f"{name}.pcap"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.name, "tcpdump", "-i", host.veth, "-n", "-U",
             "--immediate-mode", "-w", str(self.path), "ip"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until it is really listening
            ready, _, _ = select.select([self.proc.stderr], [], [], 1.0)
            if ready and "listening on" in self.proc.stderr.readline():
                return
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError("tcpdump did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def read(self) -> list[str]:
        # check=False: while tcpdump writes, the last record may be incomplete
        return sh("tcpdump", "-n", "-r", str(self.path), check=False).splitlines()

    def lines(self, pattern: str, count: int, timeout: float = 30.0) -> list[str]:
        """Wait (bounded) until `count` lines contain `pattern`, then stop and read it all:
        a slow VM's tcpdump may still be writing what was sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if sum(pattern in line for line in self.read()) >= count:
                break
            time.sleep(0.3)
        self.stop()
        return self.read()


def sniff_esp(host: Host, src: str, timeout: float = 10.0) -> socket.socket:
    """An AF_PACKET socket on `host`'s veth (sees outgoing frames too)."""
    sock = host.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((host.veth, 0))
    sock.settimeout(timeout)
    return sock


def next_esp_frame(sock: socket.socket, src: str) -> bytes:
    """The next Ethernet frame carrying ESP from `src`."""
    want = socket.inet_aton(src)
    while True:
        frame = sock.recv(65535)
        if frame[12:14] == b"\x08\x00" and frame[23] == 50 and frame[26:30] == want:
            return frame
