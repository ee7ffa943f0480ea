"""An in-memory IPsec backend for in-process tests of the sec-agree proxy: it keeps the SAD
and SPD (refusing a duplicate SA as the real backends do) and protects nothing, so the
"protected" SIP travels as plain UDP on loopback between the same ports it would use."""

from __future__ import annotations

from dataclasses import replace

from nodes.ipsec.api import (
    Direction,
    IPsecBackend,
    IPsecError,
    Policy,
    SecurityAssociation,
    Selector,
)
from nodes.ipsec.node import NodeIpsec


class MemoryBackend(IPsecBackend):
    name = "memory"

    def __init__(self) -> None:
        self.sas: dict[tuple[str, int], SecurityAssociation] = {}
        self.policies: dict[tuple[Selector, Direction], Policy] = {}
        self.changes = 0  # SAD/SPD operations, for tests that bound them

    def add_sa(self, sa: SecurityAssociation) -> None:
        if (sa.dst, sa.spi) in self.sas:
            raise IPsecError(f"SA spi=0x{sa.spi:08x} dst={sa.dst} already exists")
        self.changes += 1
        self.sas[(sa.dst, sa.spi)] = sa

    def update_sa(self, sa: SecurityAssociation) -> None:
        if (sa.dst, sa.spi) not in self.sas:
            raise IPsecError(f"no SA spi=0x{sa.spi:08x} dst={sa.dst} to update")
        self.sas[(sa.dst, sa.spi)] = sa

    def move_sa(self, dst: str, spi: int, new_src: str, new_dst: str,
                selector: Selector | None) -> SecurityAssociation:
        sa = self.sas.pop((dst, spi), None)
        if sa is None:
            raise IPsecError(f"no SA spi=0x{spi:08x} dst={dst} to move")
        moved = replace(sa, src=new_src, dst=new_dst, selector=selector or sa.selector)
        self.sas[(new_dst, spi)] = moved
        return moved

    def get_sa(self, dst: str, spi: int) -> SecurityAssociation | None:
        return self.sas.get((dst, spi))

    def delete_sa(self, dst: str, spi: int) -> None:
        if self.sas.pop((dst, spi), None) is not None:
            self.changes += 1

    def list_sas(self) -> list[SecurityAssociation]:
        return list(self.sas.values())

    def add_policy(self, policy: Policy) -> None:
        self.changes += 1
        self.policies[(policy.selector, policy.direction)] = policy

    def delete_policy(self, selector: Selector, direction: Direction) -> None:
        self.policies.pop((selector, direction), None)

    def list_policies(self) -> list[Policy]:
        return list(self.policies.values())

    def counters(self) -> dict[str, int]:
        return dict.fromkeys(("integrity_failed", "replay_dropped", "no_sa", "policy_dropped",
                              "packets_in", "packets_out"), 0)

    def flush(self) -> None:
        self.sas.clear()
        self.policies.clear()


def memory_ipsec(node: str) -> NodeIpsec:
    return NodeIpsec(MemoryBackend(), "memory", node)
