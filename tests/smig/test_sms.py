"""The SMS and presence servers' handlers without a network: what they answer, what they
send, and that a refused request leaves every session as it was."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nodes import smig
from nodes.events import EventLog
from nodes.labconfig import LabConfig
from nodes.presence import Presence
from nodes.sip.message import Request
from nodes.sip.timers import TimerConfig
from nodes.sms import SessionManager

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"offer-to-answer": {"enc": "00" * 16, "auth": "11" * 32},
        "answer-to-offer": {"enc": "22" * 16, "auth": "33" * 32}}
SECURITY = {"offer": "nonce-o;spi=1", "answer": "nonce-a;spi=2"}
ADDRESSES = {"a1": "10.0.1.10", "a2": "10.0.1.20", "b1": "10.0.3.10", "b2": "10.0.3.20"}


class FakeTx:
    """A server transaction that records the answers."""

    def __init__(self, request: Request | None = None,
                 source: tuple[str, int] = ("10.0.0.10", 5060)) -> None:
        self.request, self.source = request, source
        self.replies: list[tuple[int, str | None]] = []

    def reply(self, status: int, reason: str | None = None, **_: Any) -> None:
        self.replies.append((status, reason))

    @property
    def status(self) -> int:
        assert len(self.replies) == 1, self.replies
        return self.replies[0][0]


class Recording:
    """Mixin: `send` records instead of sending, and the terminal says 200."""

    sent: list[tuple[str, smig.Smig]]

    def send(self, terminal: str, msg: smig.Smig) -> asyncio.Future[int | None]:
        self.sent.append((terminal, msg))
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        done.set_result(200)
        return done


class Sms(Recording, SessionManager):
    pass


class Pres(Recording, Presence):
    pass


def make(cls: type[Any], tmp: Path) -> Any:
    config = LabConfig.load(ROOT / "config" / "lab.json")
    server = cls(config, EventLog(cls.name, str(tmp / f"{cls.name}.jsonl")), TimerConfig())
    server.sent = []
    return server


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def ask(server: Any, msg: smig.Smig, sender: str) -> int:
    tx = FakeTx()
    await server.handle(msg, sender, tx)
    await asyncio.sleep(0)  # let background steps (the link switch's config) run
    return tx.status


async def registered(sms: Sms, *terminals: str) -> None:
    for t in terminals:
        assert await ask(sms, smig.Registration("r", t, True, ADDRESSES[t]), "proxy") == 200


def state(sms: Sms) -> Any:
    """Everything a refusal must leave alone."""
    sessions = {sid: (dict(s.terminals), s.offerer, s.anchored,
                      None if s.switch is None else (s.switch.initiator, dict(s.switch.new),
                                                     set(s.switch.complete)))
                for sid, s in sms.sessions.items()}
    return copy.deepcopy((sessions, dict(getattr(sms, "one_user_calls", {})),
                          dict(sms.addresses)))


def switch_request(session: str = "c1", new: str = "a2", **kw: Any) -> smig.SwitchRequest:
    fields: dict[str, Any] = {"security": SECURITY, "keys": KEYS, **kw}
    return smig.SwitchRequest(session, new, "video", **fields)


# -- same-user calls ---------------------------------------------------------------------------
def test_a_call_between_one_users_terminals_keeps_both(tmp_path: Path) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await registered(sms, "a1", "a2", "b2")
        assert await ask(sms, smig.SessionEstablished("c1", "a1", "a2"), "proxy") == 200
        assert sms.status()["sessions"]["c1"]["terminals"] == ["a1", "a2"]
        before = state(sms)
        # Fig 3 and Fig 4 on it: a clear 403 (it used to crash with StopIteration), nothing
        # changed, nothing sent.
        for sender, msg in [("a1", switch_request(new="a2")), ("a2", switch_request(new="a1")),
                            ("a1", smig.LinkSwitch("c1", "a1", "10.0.2.10")),
                            ("a2", smig.Rekey("c1", "offer", "a2", key="k"))]:
            tx = FakeTx()
            await sms.handle(msg, sender, tx)
            await asyncio.sleep(0)
            assert tx.status == 403
            assert "both terminals of alice" in (tx.replies[0][1] or "")
            assert state(sms) == before
        assert sms.sent == []
        # a stranger gets the usual answer
        assert await ask(sms, smig.End("c1"), "b2") == 403
        # either terminal ends it; the other one is told
        assert await ask(sms, smig.End("c1"), "a2") == 200
        assert [(t, type(m).__name__) for t, m in sms.sent] == [("a1", "End")]
        assert "c1" not in sms.status()["sessions"]

    run(scenario)


def test_link_switch_from_the_proxy_on_a_one_user_call(tmp_path: Path) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await registered(sms, "a1", "a2")
        await ask(sms, smig.SessionEstablished("c1", "a1", "a2"), "proxy")
        assert await ask(sms, smig.LinkSwitch("c1", "a1", "10.0.2.10"), "proxy") == 403
        # the registration notice part still counts; the terminal hears nothing moves
        assert sms.addresses["a1"] == "10.0.2.10"
        assert [type(m).__name__ for _, m in sms.sent] == ["SwitchRefused"]
        assert sms.one_user_calls == {"c1": ("a1", "a2")}

    run(scenario)


# -- refusals change nothing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sender", "msg", "status"),
    [
        ("a1", switch_request(session="nope"), 404),
        ("a2", switch_request(), 403),  # not a participant
        ("a1", switch_request(new="a1"), 400),  # already the session's terminal
        ("a1", switch_request(new="b2"), 403),  # not alice's
        ("a1", smig.SwitchRequest("c1", "a2", "video"), 400),  # reuse without keys
        ("b1", smig.SwitchResponse("c1", True, "b2"), 481),  # nothing to answer
        ("a1", smig.SwitchComplete("c1", "a1"), 403),
        ("a1", smig.LinkSwitch("c1", "b1", "10.0.2.10"), 403),  # not its own terminal
        ("proxy", smig.LinkSwitch("c1", "zz", "10.0.2.10"), 400),  # unknown terminal
        ("a1", smig.Rekey("c1", "offer", "b1", key="k"), 403),
        ("b2", smig.End("c1"), 403),
        ("a1", smig.SessionEstablished("c2", "a1", "b1"), 403),  # only the proxy
        ("proxy", smig.SessionEstablished("c2", "a1", "zz"), 400),
        ("proxy", smig.Registration("r", "zz", True, "10.0.0.1"), 400),
        ("a1", smig.Registration("r", "a1", False), 403),
        ("a1", smig.SwitchDone("c1", ["a1"]), 400),  # not the SMS's to take
    ],
)
def test_refusals_leave_the_sessions_as_they_were(tmp_path: Path, sender: str,
                                                  msg: smig.Smig, status: int) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await registered(sms, "a1", "a2", "b1", "b2")
        await ask(sms, smig.SessionEstablished("c1", "a1", "b1"), "proxy")
        before = state(sms)
        assert await ask(sms, msg, sender) == status
        assert state(sms) == before
        assert sms.sent == []

    run(scenario)


async def _switching(sms: Sms) -> None:
    """a1–b1 with a switch to a2 under way (steps 1 and 2 done)."""
    await registered(sms, "a1", "a2", "b1", "b2")
    await ask(sms, smig.SessionEstablished("c1", "a1", "b1"), "proxy")
    assert await ask(sms, switch_request(), "a1") == 200
    assert [(t, type(m).__name__) for t, m in sms.sent] == [("b1", "SwitchRequest")]
    sms.sent.clear()


def test_a_malformed_answer_is_refused_and_the_switch_waits(tmp_path: Path) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await _switching(sms)
        before = state(sms)
        assert await ask(sms, smig.SwitchResponse("c1", True), "b1") == 400
        assert state(sms) == before and sms.sent == []
        # the right answer still goes through: session configs to a2 and b2
        ok = smig.SwitchResponse("c1", True, "b2", security=SECURITY, keys=KEYS)
        assert await ask(sms, ok, "b1") == 200
        assert sorted(t for t, _ in sms.sent) == ["a2", "b2"]
        sms.sessions["c1"].switch.timer.cancel()

    run(scenario)


def test_a_terminal_gone_before_step_5_aborts_without_half_a_config(tmp_path: Path) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await _switching(sms)
        await ask(sms, smig.Registration("r", "a2", False), "proxy")  # a2 unregistered
        ok = smig.SwitchResponse("c1", True, "b2", security=SECURITY, keys=KEYS)
        assert await ask(sms, ok, "b1") == 480
        assert not any(isinstance(m, smig.SessionConfig) for _, m in sms.sent)
        session = sms.sessions["c1"]
        assert session.switch is None and session.terminals == {"alice": "a1", "bob": "b1"}

    run(scenario)


def test_a_switch_response_does_not_abort_a_link_switch(tmp_path: Path) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await registered(sms, "a1", "b1", "b2")
        await ask(sms, smig.SessionEstablished("c1", "a1", "b1"), "proxy")
        assert await ask(sms, smig.LinkSwitch("c1", "a1", "10.0.2.10"), "proxy") == 200
        assert [(t, type(m).__name__) for t, m in sms.sent] == [("a1", "LinkConfig"),
                                                                ("b1", "LinkConfig")]
        before = state(sms)
        assert await ask(sms, smig.SwitchResponse("c1", True, "b2"), "b1") == 481
        assert state(sms) == before
        sms.sessions["c1"].switch.timer.cancel()

    run(scenario)


def test_end_during_a_switch_tells_the_configured_new_terminals(tmp_path: Path) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await _switching(sms)
        ok = smig.SwitchResponse("c1", True, "b2", security=SECURITY, keys=KEYS)
        assert await ask(sms, ok, "b1") == 200
        sms.sent.clear()
        assert await ask(sms, smig.End("c1"), "a1") == 200
        assert sorted(t for t, m in sms.sent if isinstance(m, smig.End)) == ["a2", "b1", "b2"]
        assert sms.sessions == {}

    run(scenario)


def test_switch_complete_names_its_sender(tmp_path: Path) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await _switching(sms)
        ok = smig.SwitchResponse("c1", True, "b2", security=SECURITY, keys=KEYS)
        await ask(sms, ok, "b1")
        before = state(sms)
        assert await ask(sms, smig.SwitchComplete("c1", "b2"), "a2") == 403
        assert state(sms) == before
        sms.sessions["c1"].switch.timer.cancel()

    run(scenario)


# -- bodies from the wire ------------------------------------------------------------------------
def _message(body: bytes, sender: str = "a1") -> Request:
    return Request("MESSAGE", "sip:sms@m2m.example", [
        ("Via", "SIP/2.0/UDP 10.0.0.10:5060;branch=z9hG4bK-1"),
        ("From", f"<sip:{sender}@m2m.example>;tag=1"), ("To", "<sip:sms@m2m.example>"),
        ("Call-ID", "m1"), ("CSeq", "1 MESSAGE"), ("Content-Type", smig.CONTENT_TYPE)], body)


@pytest.mark.parametrize("cls", [Sms, Pres])
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 1000 + b"]" * 1000, "nested deeper than 32 levels"),
        (b'{"type":"end","session":"x","reason":' + b"[" * 5000 + b"]" * 5000 + b"}",
         "nested deeper than 32 levels"),
        (b'{"type":"end","session":NaN}', "NaN is not a JSON number"),
        (b'{"type":"end","session":"x","a\\r\\nX-Evil: 1":1}',
         r"end: unknown field(s) 'a\r\nX-Evil: 1'"),
    ],
    ids=["nested-1000", "nested-field", "nan", "crlf-field-name"],
)
def test_bad_bodies_get_400_and_a_clean_reason(tmp_path: Path, cls: type[Any], body: bytes,
                                               reason: str) -> None:
    async def scenario() -> None:
        server = make(cls, tmp_path)
        tx = FakeTx(_message(body))
        await server._on_request(tx)
        assert tx.status == 400
        text = tx.replies[0][1] or ""
        assert reason in text
        assert "\r" not in text and "\n" not in text
        assert server.counters["bad-body"] == 1

    run(scenario)


def test_refusal_reasons_carry_no_line_breaks(tmp_path: Path) -> None:
    async def scenario() -> None:
        sms = make(Sms, tmp_path)
        await registered(sms, "a1", "b1")
        await ask(sms, smig.SessionEstablished("c1", "a1", "b1"), "proxy")
        tx = FakeTx()
        await sms.handle(switch_request(new="a2\r\nX-Evil: 1"), "a1", tx)
        assert tx.status == 403
        assert "\r" not in (tx.replies[0][1] or "") and "\n" not in (tx.replies[0][1] or "")

    run(scenario)


# -- presence ------------------------------------------------------------------------------------
def test_presence_refusals_change_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        pres = make(Pres, tmp_path)
        assert await ask(pres, smig.Registration("r", "a2", True, "10.0.1.20"), "proxy") == 200
        before = dict(pres.registered)
        assert await ask(pres, smig.Registration("r", "a2", False), "b1") == 403
        assert await ask(pres, smig.Registration("r", "zz", True, "10.0.0.9"), "proxy") == 400
        assert await ask(pres, smig.PresenceQuery("q", "carol", "audio"), "a1") == 404
        assert await ask(pres, smig.End("c1"), "a1") == 400
        assert pres.registered == before and pres.sent == []
        assert await ask(pres, smig.PresenceQuery("q", "alice", "video"), "b1") == 200
        [(to, result)] = pres.sent
        assert to == "b1" and isinstance(result, smig.PresenceResult)
        assert {t["terminal"]: t["registered"] for t in result.terminals} == {"a1": False,
                                                                               "a2": True}
        events = [json.loads(line) for line in (tmp_path / "presence.jsonl").read_text()
                  .splitlines()]
        assert [e["status"] for e in events if e["event"] == "refused"] == [403, 400, 404, 400]

    run(scenario)
