"""Registrar bindings: expires, refresh, several contacts, `*`, ranges, CSeq order, sources."""

from __future__ import annotations

import pytest

from nodes.registrar import MAX_EXPIRES, Registrar
from nodes.sip.message import Request

AOR = "sip:a1@m2m.example"
SRC = ("10.0.1.10", 5060)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def register(contacts: list[str], expires: int | None = None, cseq: int = 1,
             call_id: str = "reg-1", to: str = AOR) -> Request:
    headers = [("Via", "SIP/2.0/UDP 10.0.1.10:5060;branch=z9hG4bK-1"),
               ("From", f"<{to}>;tag=1"), ("To", f"<{to}>"), ("Call-ID", call_id),
               ("CSeq", f"{cseq} REGISTER"), ("Max-Forwards", "70")]
    headers += [("Contact", c) for c in contacts]
    if expires is not None:
        headers.append(("Expires", str(expires)))
    return Request("REGISTER", "sip:m2m.example", headers)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(clock: Clock) -> Registrar:
    return Registrar(lambda aor: aor in (AOR, "sip:b1@m2m.example"), clock)


def test_register_refresh_expire(reg: Registrar, clock: Clock) -> None:
    out = reg.register(register(["<sip:a1@10.0.1.10:5060>"], expires=60), SRC)
    assert (out.status, len(out.added), out.removed) == (200, 1, [])
    assert reg.aor_at(SRC) == AOR
    assert reg.bindings(AOR)[0].expires_in(clock.now) == 60
    clock.now += 50
    out = reg.register(register(["<sip:a1@10.0.1.10:5060>"], expires=60, cseq=2), SRC)
    assert (out.status, len(out.bindings), out.removed) == (200, 1, [])
    clock.now += 59
    assert len(reg.bindings(AOR)) == 1
    clock.now += 2
    assert reg.bindings(AOR) == []
    assert reg.aor_at(SRC) is None


def test_several_contacts_and_per_contact_expires(reg: Registrar, clock: Clock) -> None:
    out = reg.register(register(["<sip:a1@10.0.1.10>;expires=10", "<sip:a1@10.0.2.10>"],
                                expires=100), SRC)
    assert out.status == 200
    assert sorted(b.expires_in(clock.now) for b in out.bindings) == [10, 100]
    clock.now += 11
    assert [str(b.contact.uri) for b in reg.bindings(AOR)] == ["sip:a1@10.0.2.10"]


def test_unregister_one_and_star(reg: Registrar) -> None:
    reg.register(register(["<sip:a1@10.0.1.10>", "<sip:a1@10.0.2.10>"], expires=100), SRC)
    out = reg.register(register(["<sip:a1@10.0.1.10>"], expires=0, cseq=2), SRC)
    assert (out.status, len(out.removed), len(out.bindings)) == (200, 1, 1)
    out = reg.register(register(["*"], expires=0, cseq=3), SRC)
    assert (out.status, len(out.removed)) == (200, 1)
    assert reg.bindings(AOR) == []


@pytest.mark.parametrize(
    ("contacts", "expires", "status", "reason"),
    [
        (["*"], None, 400, "Contact * needs Expires: 0"),
        (["*"], 30, 400, "Contact * needs Expires: 0"),
        (["*", "<sip:a1@10.0.1.10>"], 0, 400, "invalid URI '*'"),
        (["<sip:a1@10.0.1.10>"], MAX_EXPIRES + 1, 400, "out of range"),
        (["<sip:a1@10.0.1.10>;expires=99999999"], None, 400, "out of range"),
        # IP hosts only: a name would need a (blocking) resolver in the proxy's event loop
        (["<sip:a1@10.0.1.10>", "<sip:a1@evil.example:5060>"], 60, 400,
         "Contact host 'evil.example' is not an IP address"),
        (["<tel:+4912345>"], 60, 400, "is not a SIP URI"),
    ],
)
def test_refusals_change_nothing(reg: Registrar, contacts: list[str], expires: int | None,
                                 status: int, reason: str) -> None:
    reg.register(register(["<sip:a1@10.0.9.9>"], expires=100, call_id="other"), SRC)
    before = [(str(b.contact), b.expires_at) for b in reg.bindings(AOR)]
    out = reg.register(register(contacts, expires=expires, cseq=5), SRC)
    assert out.status == status
    assert reason in out.reason
    assert [(str(b.contact), b.expires_at) for b in reg.bindings(AOR)] == before


def test_unknown_aor_404(reg: Registrar) -> None:
    out = reg.register(register(["<sip:x@10.0.1.10>"], to="sip:zz@m2m.example"), SRC)
    assert out.status == 404


def test_cseq_must_grow_within_call_id(reg: Registrar) -> None:
    reg.register(register(["<sip:a1@10.0.1.10>"], expires=100, cseq=5), SRC)
    out = reg.register(register(["<sip:a1@10.0.1.10>"], expires=0, cseq=5), SRC)
    assert (out.status, len(reg.bindings(AOR))) == (500, 1)
    out = reg.register(register(["<sip:a1@10.0.1.10>"], expires=0, cseq=5, call_id="new"), SRC)
    assert out.status == 200


def test_sources_and_remove_source(reg: Registrar) -> None:
    reg.register(register(["<sip:a1@10.0.1.10>"], expires=100), SRC)
    reg.register(register(["<sip:a1@10.0.2.10>"], expires=100, call_id="r2"), ("10.0.2.10", 5062))
    assert reg.aor_at(("10.0.2.10", 5062)) == AOR
    assert reg.aor_at(("10.0.2.10", 5063)) is None
    gone = reg.remove_source(SRC)
    assert [str(b.contact.uri) for b in gone] == ["sip:a1@10.0.1.10"]
    assert reg.aor_at(SRC) is None
    assert len(reg.bindings(AOR)) == 1
