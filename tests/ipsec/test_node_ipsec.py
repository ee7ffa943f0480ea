"""NodeIpsec's all-or-nothing install: a failure removes what that call added, and only that
(a policy refused as a duplicate belongs to someone else and stays)."""

from __future__ import annotations

import pytest

from nodes.ipsec.api import Direction, IPsecError, Policy, SecurityAssociation, Selector
from tests.fakeipsec import MemoryBackend, memory_ipsec

A, B = "10.0.1.10", "10.0.3.10"


def sa(spi: int) -> SecurityAssociation:
    return SecurityAssociation(A, B, spi, "aes-cbc", b"k" * 16, "hmac-sha-256-128", b"a" * 32)


def policy(dport: int, direction: Direction = Direction.OUT) -> Policy:
    return Policy(Selector(A, B, dport=dport), direction, A, B)


def test_install_rolls_back_only_its_own_work() -> None:
    ipsec = memory_ipsec("a1")
    backend = ipsec.backend
    assert isinstance(backend, MemoryBackend)
    theirs = policy(5060)
    ipsec.install([sa(0x100)], [theirs])
    with pytest.raises(IPsecError, match="exists"):
        ipsec.install([sa(0x200)], [policy(4000), policy(5060)])
    assert list(backend.sad) == [(B, 0x100)]
    assert list(backend.spd.values()) == [theirs]
    assert [p["selector"] for p in ipsec.describe()["policies"]] == [
        f"{A}:*->{B}:5060/17"]


def test_add_policies_is_all_or_nothing() -> None:
    ipsec = memory_ipsec("a1")
    backend = ipsec.backend
    assert isinstance(backend, MemoryBackend)
    ipsec.add_policies([policy(5060)])
    with pytest.raises(IPsecError, match="exists"):
        ipsec.add_policies([policy(4000, Direction.IN), policy(4000), policy(5060)])
    assert [p.selector.dport for p in backend.spd.values()] == [5060]
    ipsec.close()
    assert not backend.spd and not backend.sad
