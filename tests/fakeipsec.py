"""An in-memory IPsec backend for in-process tests: it keeps the SAD and SPD with the real
backends' rules (a duplicate SA or policy is refused, updating or moving a missing SA is an
error, a moved SA keeps SPI and keys) and encrypts nothing, so "protected" SIP and media
travel as plain UDP on loopback between the ports they would use. Tests read what each node
installed and what it left behind."""

from __future__ import annotations

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
        self.sad: dict[tuple[str, int], SecurityAssociation] = {}
        self.spd: dict[tuple[Selector, Direction], Policy] = {}
        self.changes = 0  # SAD/SPD operations, for tests that bound them

    # -- SAD --
    def add_sa(self, sa: SecurityAssociation) -> None:
        if (sa.dst, sa.spi) in self.sad:
            raise IPsecError(f"SA spi=0x{sa.spi:08x} dst={sa.dst} already exists")
        self.changes += 1
        self.sad[(sa.dst, sa.spi)] = sa

    def update_sa(self, sa: SecurityAssociation) -> None:
        if (sa.dst, sa.spi) not in self.sad:
            raise IPsecError(f"no SA spi=0x{sa.spi:08x} dst={sa.dst} to update")
        self.sad[(sa.dst, sa.spi)] = sa

    def move_sa(self, dst: str, spi: int, new_src: str, new_dst: str,
                selector: Selector | None) -> SecurityAssociation:
        sa = self.sad.get((dst, spi))
        if sa is None:
            raise IPsecError(f"no SA spi=0x{spi:08x} dst={dst} to move")
        if new_dst != dst and (new_dst, spi) in self.sad:
            raise IPsecError(f"SA spi=0x{spi:08x} dst={new_dst} already exists")
        del self.sad[(dst, spi)]
        moved = sa.moved(new_src, new_dst, selector)
        self.sad[(new_dst, spi)] = moved
        return moved

    def get_sa(self, dst: str, spi: int) -> SecurityAssociation | None:
        return self.sad.get((dst, spi))

    def delete_sa(self, dst: str, spi: int) -> None:
        if self.sad.pop((dst, spi), None) is not None:
            self.changes += 1

    def list_sas(self) -> list[SecurityAssociation]:
        return list(self.sad.values())

    # -- SPD --
    def add_policy(self, policy: Policy) -> None:
        key = (policy.selector, policy.direction)
        if key in self.spd:
            raise IPsecError(f"policy {policy.selector} {policy.direction.value} exists")
        self.changes += 1
        self.spd[key] = policy

    def update_policy(self, policy: Policy) -> None:
        self.spd[(policy.selector, policy.direction)] = policy

    def delete_policy(self, selector: Selector, direction: Direction) -> None:
        self.spd.pop((selector, direction), None)

    def list_policies(self) -> list[Policy]:
        return list(self.spd.values())

    def counters(self) -> dict[str, int]:
        return dict.fromkeys(("integrity_failed", "replay_dropped", "no_sa", "policy_dropped",
                              "packets_in", "packets_out"), 0)

    def flush(self) -> None:
        self.sad.clear()
        self.spd.clear()


def memory_ipsec(node: str) -> NodeIpsec:
    return NodeIpsec(MemoryBackend(), "memory", node)
