"""The userspace engine's SPD/SAD and packet classification (pure, no I/O).

`Ipv4Packet` parses and rebuilds the IPv4 packets the engine reads from and writes to its TUN
device; `Spd` holds the policies and picks the SA for a packet the way XFRM does (lowest
priority value first, template addresses and optional SPI); `nft_ruleset` renders the
nftables rules that steer outbound packets to the TUN and drop plaintext that an IN policy
says must arrive protected.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, replace

from nodes.ipsec.api import IPPROTO_ESP, Direction, Policy, SecurityAssociation, Selector

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_PORT_PROTOS = (6, 17, 132, 136)  # TCP, UDP, SCTP, UDP-Lite: ports in the first 4 bytes


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class Ipv4Packet:
    """An IPv4 packet: the header fields Linux keeps when it adds or removes transport-mode
    ESP (TOS, ID, flags/fragment offset, TTL, options) and the payload."""

    src: str
    dst: str
    proto: int
    payload: bytes
    tos: int = 0
    ident: int = 0
    frag: int = 0x4000  # DF, offset 0
    ttl: int = 64
    options: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> Ipv4Packet:
        if len(data) < _IPV4.size:
            raise ValueError(f"IPv4 packet too short: {len(data)} bytes")
        vihl, tos, total, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(data)
        if vihl >> 4 != 4:
            raise ValueError(f"not IPv4: version {vihl >> 4}")
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl or total > len(data):
            raise ValueError(f"bad IPv4 lengths: header {ihl}, total {total}, have {len(data)}")
        return cls(
            str(ipaddress.IPv4Address(src)),
            str(ipaddress.IPv4Address(dst)),
            proto,
            bytes(data[ihl:total]),
            tos,
            ident,
            frag,
            ttl,
            bytes(data[20:ihl]),
        )

    def serialize(self) -> bytes:
        if len(self.options) % 4 or len(self.options) > 40:
            raise ValueError(f"IPv4 options must be 0..40 bytes in 4s, got {len(self.options)}")
        ihl = 20 + len(self.options)
        fields = [
            0x40 | ihl // 4, self.tos, ihl + len(self.payload), self.ident, self.frag,
            self.ttl, self.proto, 0,
            ipaddress.IPv4Address(self.src).packed, ipaddress.IPv4Address(self.dst).packed,
        ]
        header = _IPV4.pack(*fields) + self.options
        fields[7] = _checksum(header)
        return _IPV4.pack(*fields) + self.options + self.payload

    def with_payload(self, proto: int, payload: bytes) -> Ipv4Packet:
        return replace(self, proto=proto, payload=payload)

    @property
    def is_fragment(self) -> bool:
        return bool(self.frag & 0x3FFF)  # MF or a non-zero offset

    def ports(self) -> tuple[int, int]:
        if self.proto in _PORT_PROTOS and len(self.payload) >= 4 and not self.is_fragment:
            sport, dport = struct.unpack_from("!HH", self.payload)
            return int(sport), int(dport)
        return 0, 0

    def matches(self, selector: Selector) -> bool:
        return selector.matches(self.src, self.dst, self.proto, *self.ports())


class Spd:
    """Policies by (selector, direction), looked up in XFRM priority order."""

    def __init__(self) -> None:
        self._policies: dict[tuple[Selector, Direction], Policy] = {}

    def add(self, policy: Policy) -> None:
        """ValueError for a malformed policy or a duplicate (selector, direction)."""
        check_policy(policy)
        key = (policy.selector, policy.direction)
        if key in self._policies:
            raise ValueError(f"a {policy.direction.value} policy for {policy.selector} exists")
        self._policies[key] = policy

    def delete(self, selector: Selector, direction: Direction) -> bool:
        return self._policies.pop((selector, direction), None) is not None

    def policies(self, direction: Direction | None = None) -> list[Policy]:
        found = [p for p in self._policies.values() if direction in (None, p.direction)]
        return sorted(found, key=lambda p: p.priority)

    def lookup(self, packet: Ipv4Packet, direction: Direction) -> Policy | None:
        return next((p for p in self.policies(direction) if packet.matches(p.selector)), None)

    def clear(self) -> None:
        self._policies.clear()


def check_ipv4(*addresses: str) -> None:
    for address in addresses:
        try:
            ipaddress.IPv4Address(address)
        except ValueError as exc:
            raise ValueError(f"not an IPv4 address: {address!r}") from exc


def check_policy(policy: Policy) -> None:
    sel = policy.selector
    check_ipv4(sel.src, sel.dst, policy.tmpl_src, policy.tmpl_dst)
    if not 0 <= sel.proto <= 255 or not 0 <= sel.sport <= 65535 or not 0 <= sel.dport <= 65535:
        raise ValueError(f"selector out of range: {sel}")
    if policy.spi is not None and not 256 <= policy.spi < 2**32:
        raise ValueError(f"policy SPI {policy.spi} out of range")


def template_accepts(policy: Policy, sa: SecurityAssociation) -> bool:
    """Whether `sa` satisfies the policy's ESP template (addresses and, if pinned, SPI)."""
    return (
        sa.src == policy.tmpl_src
        and sa.dst == policy.tmpl_dst
        and (policy.spi is None or policy.spi == sa.spi)
    )


def _match(selector: Selector) -> str:
    parts = [f"ip saddr {selector.src} ip daddr {selector.dst}"]
    if selector.proto:
        parts.append(f"meta l4proto {selector.proto}")
    else:
        parts.append(f"meta l4proto != {IPPROTO_ESP}")  # never loop our own ESP to the TUN
    if selector.sport:
        parts.append(f"th sport {selector.sport}")
    if selector.dport:
        parts.append(f"th dport {selector.dport}")
    return " ".join(parts)


def nft_ruleset(table: str, tun: str, mark: int, policies: list[Policy]) -> str:
    """An `nft -f` script replacing the rules of our table atomically. The named counter
    `policy_drops` survives rule changes (chains are flushed, the counter is not)."""
    for p in policies:  # callers validated them already, but nft syntax must stay ours
        check_policy(p)
    lines = [
        f"table ip {table} {{",
        "  counter policy_drops { }",
        "  chain out { type route hook output priority mangle; policy accept; }",
        "  chain in { type filter hook input priority filter; policy accept; }",
        "}",
        f"flush chain ip {table} out",
        f"flush chain ip {table} in",
    ]
    for p in policies:
        if p.direction is Direction.OUT:
            lines.append(f"add rule ip {table} out {_match(p.selector)} meta mark set {mark}")
        elif p.direction is Direction.IN:
            lines.append(
                f'add rule ip {table} in iifname != "{tun}" {_match(p.selector)} '
                'counter name "policy_drops" drop'
            )
    return "\n".join(lines) + "\n"
