"""Pure tests of the userspace engine's IPv4 handling, SPD lookup and nft rule rendering."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP

from nodes.ipsec.api import Direction, Policy, SecurityAssociation, Selector
from nodes.ipsec.spd import Ipv4Packet, Spd, nft_ruleset, template_accepts

A, B = "10.99.1.1", "10.99.1.2"


def test_ipv4_round_trip_and_checksum_match_scapy() -> None:
    pkt = IP(src=A, dst=B, ttl=17, id=4242, tos=0x10, flags="DF") / UDP(sport=1, dport=2) / b"x"
    wire = bytes(pkt)
    parsed = Ipv4Packet.parse(wire)
    assert (parsed.src, parsed.dst, parsed.proto, parsed.ttl, parsed.ident) == (A, B, 17, 17,
                                                                                 4242)
    assert parsed.ports() == (1, 2)
    assert parsed.serialize() == wire
    # Transport-mode ESP keeps the header and changes protocol and length, as Linux does.
    esp = parsed.with_payload(50, b"\x00" * 40).serialize()
    ref = IP(src=A, dst=B, ttl=17, id=4242, tos=0x10, flags="DF", proto=50) / (b"\x00" * 40)
    assert esp == bytes(ref)


def test_ipv4_options_and_trailing_bytes() -> None:
    pkt = IP(src=A, dst=B, options=b"\x94\x04\x00\x00") / UDP() / b"abc"
    parsed = Ipv4Packet.parse(bytes(pkt) + b"ethernet padding")
    assert parsed.options == b"\x94\x04\x00\x00"
    assert parsed.serialize() == bytes(pkt)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x45" * 10, "too short"),
        (bytes(IP(version=6, src=A, dst=B)), "not IPv4"),
        (bytes(IP(src=A, dst=B, len=100)), "bad IPv4 lengths"),
    ],
)
def test_ipv4_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Ipv4Packet.parse(data)


def test_fragments_have_no_ports() -> None:
    frag = Ipv4Packet(A, B, 17, b"\x00\x01\x00\x02rest", frag=0x2000)  # MF set
    assert frag.is_fragment and frag.ports() == (0, 0)


def _policy(sport: int, priority: int, direction: Direction = Direction.OUT) -> Policy:
    return Policy(Selector(A, B, 17, sport, 0), direction, A, B, priority=priority)


def test_spd_lookup_by_priority_and_direction() -> None:
    spd = Spd()
    wide, narrow = _policy(0, 2000), _policy(5000, 100)
    spd.add(wide)
    spd.add(narrow)
    spd.add(_policy(5000, 1, Direction.IN))
    pkt = Ipv4Packet.parse(bytes(IP(src=A, dst=B) / UDP(sport=5000, dport=9)))
    assert spd.lookup(pkt, Direction.OUT) == narrow
    other = Ipv4Packet.parse(bytes(IP(src=A, dst=B) / UDP(sport=5001, dport=9)))
    assert spd.lookup(other, Direction.OUT) == wide
    with pytest.raises(ValueError, match="exists"):
        spd.add(narrow)
    assert spd.delete(narrow.selector, Direction.OUT)
    assert not spd.delete(narrow.selector, Direction.OUT)


@pytest.mark.parametrize(
    "policy",
    [
        Policy(Selector("10.0.0.1; drop", B), Direction.OUT, A, B),
        Policy(Selector(A, B, sport=70000), Direction.OUT, A, B),
        Policy(Selector(A, B), Direction.OUT, A, "nowhere"),
        Policy(Selector(A, B), Direction.OUT, A, B, spi=5),
    ],
)
def test_spd_rejects_malformed_policies(policy: Policy) -> None:
    spd = Spd()
    with pytest.raises(ValueError):
        spd.add(policy)
    assert spd.policies() == []


def test_template_accepts() -> None:
    sa = SecurityAssociation(A, B, 0x1001, "null", b"", "hmac-sha-1-96", b"k" * 20)
    assert template_accepts(Policy(Selector(A, B), Direction.IN, A, B), sa)
    assert template_accepts(Policy(Selector(A, B), Direction.IN, A, B, spi=0x1001), sa)
    assert not template_accepts(Policy(Selector(A, B), Direction.IN, A, B, spi=0x1002), sa)
    assert not template_accepts(Policy(Selector(A, B), Direction.IN, B, A), sa)


def test_nft_ruleset() -> None:
    script = nft_ruleset("smig_esp_t", "smespt", 7, [
        Policy(Selector(A, B, 17, 5000, 6000), Direction.OUT, A, B),
        Policy(Selector(B, A, 0, 0, 0), Direction.IN, B, A),
        Policy(Selector(B, A, 0, 0, 0), Direction.OUT, B, A),
    ])
    assert ("add rule ip smig_esp_t out ip saddr 10.99.1.1 ip daddr 10.99.1.2 meta l4proto 17 "
            "th sport 5000 th dport 6000 meta mark set 7") in script
    assert ('add rule ip smig_esp_t in iifname != "smespt" ip saddr 10.99.1.2 ip daddr '
            '10.99.1.1 meta l4proto != 50 counter name "policy_drops" drop') in script
    assert "meta l4proto != 50 meta mark set 7" in script  # any-protocol never grabs ESP
    assert script.index("flush chain ip smig_esp_t out") < script.index("add rule")
