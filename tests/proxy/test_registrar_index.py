"""The registrar's source and contact indexes answer as a scan of all bindings would,
through registration, refresh, expiry, purge, `*`, remove_source and refusals."""

from __future__ import annotations

import random

from nodes.registrar import Binding, Registrar
from nodes.sip.message import Request
from nodes.sip.uri import SipUri

AORS = [f"sip:t{i}@m2m.example" for i in range(6)]


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def register(aor: str, contacts: list[str], expires: int, call_id: str, cseq: int) -> Request:
    return Request("REGISTER", "sip:m2m.example", [
        ("Via", "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-1"), ("From", f"<{aor}>;tag=1"),
        ("To", f"<{aor}>"), ("Call-ID", call_id), ("CSeq", f"{cseq} REGISTER"),
        *[("Contact", c) for c in contacts], ("Expires", str(expires))])


def scan_aor_at(reg: Registrar, clock: Clock, source: tuple[str, int]) -> set[str]:
    return {aor for aor, bs in reg._bindings.items()
            if any(b.source == source and b.expires_at > clock.now for b in bs)}


def scan_contact(reg: Registrar, clock: Clock, host: str, port: int) -> list[Binding]:
    out = []
    for bs in reg._bindings.values():
        for b in bs:
            c = b.contact.uri
            if isinstance(c, SipUri) and (c.host, c.port or 5060) == (host, port) and \
                    b.expires_at > clock.now:
                out.append(b)
    return out


def test_indexes_match_a_full_scan_under_random_operations() -> None:
    rng = random.Random(7)
    clock = Clock()
    reg = Registrar(lambda aor: aor in AORS, clock)
    sources = [("127.0.0.2", 5000 + i) for i in range(4)]
    hosts = [("127.0.0.3", 6000 + i) for i in range(4)] + [("127.0.0.3", 5060)]
    for step in range(600):
        op = rng.random()
        cseq = step + 1
        if op < 0.6:
            aor = rng.choice(AORS)
            chosen = rng.sample(hosts, rng.randint(1, 2))
            contacts = [f"<sip:u@{h}:{p}>" if p != 5060 else f"<sip:u@{h}>" for h, p in chosen]
            call_id = rng.choice(["c1", "c2", f"c{step}"])
            reg.register(register(aor, contacts, rng.choice([0, 5, 30, 3600]), call_id,
                                  rng.choice([cseq, 1])), rng.choice(sources))
        elif op < 0.7:
            req = register(rng.choice(AORS), ["*"], 0, f"s{step}", cseq)
            reg.register(req, rng.choice(sources))
        elif op < 0.8:
            reg.remove_source(rng.choice(sources))
        elif op < 0.9:
            clock.now += rng.choice([1, 10, 40])
            if rng.random() < 0.5:
                reg.purge()
        else:
            reg.bindings(rng.choice(AORS))
        for src in sources:
            found = reg.aor_at(src)
            expected = scan_aor_at(reg, clock, src)
            assert (found in expected) if expected else found is None, (step, src)
            assert reg.bound_from(src) == bool(expected)
        for host, port in hosts:
            b = reg.binding_for_contact(host, port)
            expected_b = scan_contact(reg, clock, host, port)
            assert (b in expected_b) if expected_b else b is None, (step, host, port)


def test_refused_register_leaves_indexes_alone() -> None:
    clock = Clock()
    reg = Registrar(lambda aor: aor in AORS, clock)
    src = ("127.0.0.2", 5000)
    assert reg.register(register(AORS[0], ["<sip:u@127.0.0.3:6000>"], 60, "c", 5), src).status \
        == 200
    assert reg.register(register(AORS[0], ["<sip:u@127.0.0.3:6001>"], 99999999, "c", 6),
                        ("127.0.0.2", 5001)).status == 400
    assert reg.register(register(AORS[0], ["<sip:u@127.0.0.3:6000>"], 60, "c", 4),
                        ("127.0.0.2", 5001)).status == 500
    assert reg.aor_at(src) == AORS[0] and reg.aor_at(("127.0.0.2", 5001)) is None
    assert reg.binding_for_contact("127.0.0.3", 6001) is None
    b = reg.binding_for_contact("127.0.0.3", 6000)
    assert b is not None and b.source == src
