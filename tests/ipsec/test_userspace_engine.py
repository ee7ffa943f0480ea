"""The userspace engine's packet path without devices (no root): two backends that were never
started, the TUN replaced by a pipe and the raw socket by a list."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP

from nodes.ipsec.api import Direction, IPsecError, Policy, SecurityAssociation, Selector
from nodes.ipsec.spd import Ipv4Packet
from nodes.ipsec.userspace import UserspaceBackend

A, B, A2 = "10.99.1.1", "10.99.1.2", "10.99.2.1"
KEYS = (b"\x03" * 16, b"\x04" * 32)


class Harness:
    def __init__(self, esp_sa: Path | None = None) -> None:
        self.backend = UserspaceBackend(esp_sa_path=esp_sa)
        self.sent: list[bytes] = []
        self.tun_r, tun_w = os.pipe()
        os.set_blocking(self.tun_r, False)
        self.backend._tun_fd = tun_w
        self.backend._send = lambda packet: self.sent.append(packet.serialize())  # type: ignore[method-assign]

    def delivered(self) -> bytes | None:
        try:
            return os.read(self.tun_r, 65535)
        except BlockingIOError:
            return None

    def close(self) -> None:
        os.close(self.tun_r)
        self.backend.close()


def sa(src: str, dst: str, spi: int, selector: Selector | None = None) -> SecurityAssociation:
    return SecurityAssociation(src, dst, spi, "aes-cbc", KEYS[0], "hmac-sha-256-128", KEYS[1],
                               selector=selector)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Harness, Harness]]:
    a, b = Harness(tmp_path / "esp_sa"), Harness(tmp_path / "esp_sa")
    try:
        for h in (a, b):
            h.backend.add_sa(sa(A, B, 0x1001))
        a.backend.add_policy(Policy(Selector(A, B, 17, 5000, 6000), Direction.OUT, A, B))
        b.backend.add_policy(Policy(Selector(A, B, 17, 5000, 6000), Direction.IN, A, B))
        yield a, b
    finally:
        a.close()
        b.close()


def datagram(payload: bytes, sport: int = 5000, src: str = A) -> bytes:
    return bytes(IP(src=src, dst=B, id=77, ttl=9) / UDP(sport=sport, dport=6000) / payload)


def test_outbound_inbound_round_trip(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    plain = datagram(b"hi")
    a.backend._outbound(plain)
    (wire,) = a.sent
    outer = Ipv4Packet.parse(wire)
    assert (outer.proto, outer.ident, outer.ttl, outer.src, outer.dst) == (50, 77, 9, A, B)
    b.backend._inbound(wire)
    assert b.delivered() == plain  # same header (protocol, length, checksum restored)
    b.backend._inbound(wire)
    assert b.delivered() is None
    assert b.backend.counters()["replay_dropped"] == 1
    assert a.backend.counters()["packets_out"] == 1 and b.backend.counters()["packets_in"] == 1


def test_unknown_spi_and_garbage_are_counted(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    a.backend._outbound(datagram(b"x"))
    wire = bytearray(a.sent[0])
    wire[20:24] = (0x9999).to_bytes(4, "big")
    b.backend._inbound(bytes(wire))
    b.backend._inbound(b"\x45\x00")
    counters = b.backend.counters()
    assert counters["no_sa"] == 1 and counters["malformed"] == 1


def test_outbound_without_sa_or_policy_is_dropped(pair: tuple[Harness, Harness]) -> None:
    a, _ = pair
    a.backend._outbound(datagram(b"x", sport=5001))  # no OUT policy matches
    a.backend.delete_sa(B, 0x1001)
    a.backend._outbound(datagram(b"x"))  # policy, but no SA
    assert a.sent == []
    assert a.backend.counters()["policy_dropped"] == 1
    assert a.backend.counters()["no_sa"] == 1


def test_in_policy_template_and_sa_selector_are_enforced(pair: tuple[Harness, Harness]) -> None:
    a, b = pair
    # B's IN policy for port 5001 demands SPI 0x1002: a packet under 0x1001 is refused.
    b.backend.add_policy(Policy(Selector(A, B, 17, 5001, 6000), Direction.IN, A, B, spi=0x1002))
    a.backend.add_policy(Policy(Selector(A, B, 17, 5001, 6000), Direction.OUT, A, B))
    a.backend._outbound(datagram(b"x", sport=5001))
    b.backend._inbound(a.sent[-1])
    assert b.delivered() is None
    assert b.backend.counters()["policy_dropped"] == 1
    # An SA bound to a selector carries only what the selector covers.
    b.backend.update_sa(sa(A, B, 0x1001, Selector(A, B, 17, 5000, 6000)))
    a.backend._outbound(datagram(b"y", sport=5000))
    b.backend._inbound(a.sent[-1])
    assert b.delivered() == datagram(b"y")


def test_move_sa_source_only_keeps_window(pair: tuple[Harness, Harness], tmp_path: Path) -> None:
    a, b = pair
    a.backend._outbound(datagram(b"1"))
    old_wire = a.sent[-1]
    b.backend._inbound(old_wire)
    assert b.delivered() is not None
    # The sender moved to A2: the receiver's SA keeps its (dst, SPI) key, only src changes.
    for h in (a, b):
        h.backend.move_sa(B, 0x1001, A2, B, None)
    a.backend.delete_policy(Selector(A, B, 17, 5000, 6000), Direction.OUT)
    a.backend.add_policy(Policy(Selector(A2, B, 17, 5000, 6000), Direction.OUT, A2, B))
    a.backend._outbound(datagram(b"2", src=A2))
    assert Ipv4Packet.parse(a.sent[-1]).payload[4:8] == (2).to_bytes(4, "big")
    b.backend._inbound(a.sent[-1])
    assert b.delivered() == datagram(b"2", src=A2)
    b.backend._inbound(old_wire.replace(bytes([10, 99, 1, 1]), bytes([10, 99, 2, 1]), 1))
    assert b.backend.counters()["replay_dropped"] == 1
    moved = b.backend.get_sa(B, 0x1001)
    assert moved is not None and moved.src == A2 and moved.replay_top == 2
    rows = (tmp_path / "esp_sa").read_text().splitlines()
    assert sum('"10.99.2.1","10.99.1.2","0x00001001"' in r for r in rows) == 2  # both ends
    with pytest.raises(IPsecError, match="no SA"):
        b.backend.move_sa(B, 0x7777, A2, B, None)
    with pytest.raises(ValueError, match="not an IPv4"):
        b.backend.move_sa(B, 0x1001, "x", B, None)
    assert b.backend.get_sa(B, 0x1001) is not None


def test_outbound_sa_chosen_by_its_selector(pair: tuple[Harness, Harness]) -> None:
    """Sec-agree: several SAs between the same addresses, told apart by their port selectors
    (policies not pinned to an SPI), as XFRM picks them."""
    a, _ = pair
    a.backend.delete_sa(B, 0x1001)
    a.backend.add_sa(sa(A, B, 0x2001, Selector(A, B, 17, 5000, 6000)))
    a.backend.add_sa(sa(A, B, 0x2002, Selector(A, B, 17, 5001, 6000)))
    a.backend.add_sa(sa(A, B, 0x2003))  # catch-all: used only when no selector fits
    a.backend.add_policy(Policy(Selector(A, B, 17, 5001, 6000), Direction.OUT, A, B))
    a.backend.add_policy(Policy(Selector(A, B, 17, 5002, 6000), Direction.OUT, A, B))
    for sport in (5001, 5000, 5002):
        a.backend._outbound(datagram(b"x", sport=sport))
    spis = [int.from_bytes(Ipv4Packet.parse(w).payload[:4], "big") for w in a.sent]
    assert spis == [0x2002, 0x2001, 0x2003]
