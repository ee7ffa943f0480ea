"""The proxy's rules against clients that do not play along (open mode, real UDP on
loopback): the friends-only policy for contact URIs, Routes and forged in-dialog requests;
forged and stray responses; malformed input from unregistered and registered sources;
client-written received/rport; host-name contacts.

Config: alice (a1), bob (b1), carol (a2); only alice and bob are friends.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nodes.labconfig import LabConfig
from nodes.proxy_admission import DropBook
from tests.proxy.rawsip import RawSip, branch
from tests.proxy.test_proxy_loopback import Net, T, run, until

pytestmark = pytest.mark.timeout(30)
CONFIG = LabConfig.from_dict({
    "domain": "m2m.example",
    "users": {"alice": {"terminals": {"a1": ["audio"]}},
              "bob": {"terminals": {"b1": ["audio"]}},
              "carol": {"terminals": {"a2": ["audio"]}}},
    "friends": [["alice", "bob"]],
    "servers": {"proxy": "10.0.0.10", "sms": "10.0.0.11", "presence": "10.0.0.12"},
})
D = "m2m.example"


def proxy_addr(net: Net) -> tuple[str, int]:
    return ("127.0.0.1", net.proxy.port)


async def registered(net: Net, ip: str, user: str) -> RawSip:
    raw = RawSip(ip)
    raw.send(raw.register(user), proxy_addr(net))
    assert await raw.statuses() == ["SIP/2.0 200 OK"]
    return raw


def no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


def test_non_friend_cannot_reach_a_terminal_by_its_contact(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        a1 = await net.terminal("a1", "127.0.0.2")
        b1 = await net.terminal("b1", "127.0.0.3")
        a2 = await net.terminal("a2", "127.0.0.4")  # carol
        for t in (a1, b1, a2):
            assert (await t.register())["status"] == 200
        contact = f"sip:b1@127.0.0.3:{b1.port}"
        assert (await a2.call("b1"))["status"] == 403
        assert (await a2.call(contact))["status"] == 403  # was 200: the policy skipped it
        assert (await a2.message(contact, "hi bob"))["status"] == 403
        assert b1.calls == {} and b1.messages == []
        # A friend may use the contact: it stands for b1, whose policy lets alice in.
        assert (await a1.message(contact, "hi"))["status"] == 200
        assert [m["text"] for m in b1.messages] == ["hi"]
        assert net.proxy.status()["counters"]["forbidden-policy"] == 3

    run(scenario, tmp_path, CONFIG)


def test_a_route_does_not_lead_past_the_policy_or_anywhere_else(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        b1 = await net.terminal("b1", "127.0.0.3")
        await b1.register()
        carol = await registered(net, "127.0.0.4", "a2")
        alice = await registered(net, "127.0.0.2", "a1")
        victim = RawSip("127.0.0.9")
        try:
            text = "Content-Type: text/plain\r\n"
            to_b1 = f"Route: <sip:127.0.0.3:{b1.port};lr>\r\n{text}"
            carol.send(carol.request("MESSAGE", f"sip:b1@{D}", frm=f"sip:a2@{D}",
                                     to=f"<sip:b1@{D}>", extra=to_b1, body=b"x"),
                       proxy_addr(net))
            assert await carol.statuses() == ["SIP/2.0 403 Route does not lead through "
                                              "this proxy"]
            # Nor is the proxy an open relay, for friends either.
            relay = f"Route: <sip:{victim.addr[0]}:{victim.addr[1]};lr>\r\n{text}"
            alice.send(alice.request("MESSAGE", f"sip:b1@{D}", frm=f"sip:a1@{D}",
                                     to=f"<sip:b1@{D}>", extra=relay, body=b"x"),
                       proxy_addr(net))
            assert (await alice.statuses())[0].startswith("SIP/2.0 403")
            assert await victim.replies(0.1) == []
            # A Route naming the proxy itself is its own: taken off, the request goes on.
            own = f"Route: <sip:127.0.0.1:{net.proxy.port};lr>\r\n{text}"
            alice.send(alice.request("MESSAGE", f"sip:b1@{D}", frm=f"sip:a1@{D}",
                                     to=f"<sip:b1@{D}>", extra=own, body=b"ok"),
                       proxy_addr(net))
            assert await alice.statuses() == ["SIP/2.0 200 OK"]
            assert [m["text"] for m in b1.messages] == ["ok"]
        finally:
            for raw in (carol, alice, victim):
                raw.close()
        assert net.proxy.status()["counters"]["forbidden-route"] == 2

    run(scenario, tmp_path, CONFIG)


def test_in_dialog_requests_must_belong_to_a_proxied_dialog(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        a1 = await net.terminal("a1", "127.0.0.2")
        b1 = await net.terminal("b1", "127.0.0.3")
        for t in (a1, b1):
            await t.register()
        call = await a1.call("b1")
        cid = call["call_id"]
        await until(lambda: cid in b1.calls, "b1's dialog")
        dlg = a1.calls[cid]
        carol = await registered(net, "127.0.0.4", "a2")
        contact = f"sip:b1@127.0.0.3:{b1.port}"
        try:
            def bye(call_id: str, from_tag: str, to_tag: str, method: str = "BYE") -> bytes:
                return carol.request(method, contact, frm=f"sip:a2@{D}", from_tag=from_tag,
                                     to=f"<sip:b1@{D}>;tag={to_tag}", call_id=call_id,
                                     cseq=f"7 {method}")

            # Made-up dialog, and a1's real one with carol as the sender: both refused.
            for forged in (bye("made-up@x", "t1", "t2"),
                           bye(cid, dlg.local_tag, dlg.remote_tag)):
                carol.send(forged, proxy_addr(net))
                assert await carol.statuses() == ["SIP/2.0 403 Not in a dialog set up "
                                                  "through this proxy"]
            carol.send(bye(cid, dlg.local_tag, dlg.remote_tag, "ACK"), proxy_addr(net))
            assert await carol.replies() == []
            assert cid in b1.calls  # nothing reached b1
            counters = net.proxy.status()["counters"]
            assert counters["forbidden-dialog"] == 2 and counters["dropped-ack"] == 1
            # The parties themselves are fine; after the BYE the dialog is gone.
            assert (await a1.hangup(cid))["status"] == 200
            await until(lambda: cid not in b1.calls, "b1 to see the BYE")
            assert net.proxy.dialogs == {}
        finally:
            carol.close()

    run(scenario, tmp_path, CONFIG)


def test_forged_and_stray_responses_go_nowhere(tmp_path: Path) -> None:
    """A 200 whose second Via names a victim: from an unknown host (dropped unread) and from
    a registered one (no transaction or dialog of ours matches it)."""
    async def scenario(net: Net) -> None:
        victim = RawSip("127.0.0.9")
        stranger = RawSip("127.0.0.5")
        carol = await registered(net, "127.0.0.4", "a2")
        try:
            forged = (f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:{net.proxy.port};"
                      f"branch={branch()}\r\nVia: SIP/2.0/UDP {victim.addr[0]}:"
                      f"{victim.addr[1]};branch={branch()}\r\nFrom: <sip:a@b>;tag=1\r\n"
                      "To: <sip:b@c>;tag=2\r\nCall-ID: forged\r\nCSeq: 1 INVITE\r\n"
                      "Content-Length: 0\r\n\r\n").encode()
            stranger.send(forged, proxy_addr(net))
            carol.send(forged, proxy_addr(net))
            assert await victim.replies() == []
        finally:
            for raw in (victim, stranger, carol):
                raw.close()
        counters = net.proxy.status()["counters"]
        assert counters["dropped-response"] == 1
        assert counters["dropped-stray-response"] == 1

    run(scenario, tmp_path, CONFIG)


def test_2xx_retransmissions_go_to_the_caller_whatever_their_via_says(tmp_path: Path) -> None:
    """In the INVITE client transaction's Accepted state and after it (Timer M): relayed to
    the caller's address the proxy recorded, not to a Via the callee rewrote."""
    async def scenario(net: Net) -> None:
        caller = await registered(net, "127.0.0.2", "a1")
        callee = await registered(net, "127.0.0.3", "b1")
        victim = RawSip("127.0.0.9")
        try:
            caller.send(caller.request(
                "INVITE", f"sip:b1@{D}", frm=f"sip:a1@{D}", to=f"<sip:b1@{D}>",
                extra=f"Contact: <sip:a1@{caller.addr[0]}:{caller.addr[1]}>\r\n"),
                proxy_addr(net))
            invite = next(d for d in await callee.replies() if d.startswith(b"INVITE"))
            head = invite.split(b"\r\n\r\n")[0].split(b"\r\n")
            keep = [h for h in head[1:] if h.split(b":")[0].lower() in (
                b"via", b"from", b"call-id", b"cseq", b"record-route")]
            to = next(h for h in head if h.startswith(b"To:"))
            ok = b"\r\n".join([b"SIP/2.0 200 OK", *keep, to + b";tag=callee",
                               f"Contact: <sip:b1@127.0.0.3:{callee.addr[1]}>".encode(),
                               b"Content-Length: 0", b"", b""])
            callee.send(ok, proxy_addr(net))
            assert [s for s in await caller.statuses() if "200" in s] == ["SIP/2.0 200 OK"]
            vias = [h for h in keep if h.lower().startswith(b"via")]
            assert len(vias) == 2
            evil = ok.replace(vias[1], f"Via: SIP/2.0/UDP {victim.addr[0]}:{victim.addr[1]};"
                              f"branch={branch()}".encode())
            for wait in (0.0, T.m + 0.3):  # Accepted, then after Timer M
                await victim.replies(wait)
                callee.send(evil, proxy_addr(net))
                assert [s for s in await caller.statuses()] == ["SIP/2.0 200 OK"]
                assert await victim.replies(0.05) == []
        finally:
            for raw in (caller, callee, victim):
                raw.close()
        assert net.proxy.status()["counters"]["fwd-2xx-retransmission"] == 2

    run(scenario, tmp_path, CONFIG)


def test_unregistered_sources_get_an_answer_only_to_a_register(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(net: Net) -> None:
        raw = RawSip("127.0.0.5")
        ok = raw.request("OPTIONS", f"sip:b1@{D}", frm=f"sip:a2@{D}", to=f"<sip:b1@{D}>")
        bad = [
            ok.replace(b"Content-Length: 0", b"Content-Length: 999"),
            ok.replace(b"Content-Length: 0", b"Content-Length: 0\r\nContent-Length: 0"),
            ok.replace(b"Content-Length: 0", b"Content-Length: abc"),
            b"\r\n".join(h for h in ok.split(b"\r\n") if not h.startswith(b"Via")),
            ok.replace(ok.split(b"\r\n")[1], b"Via: garbage"),
            ok.replace(f"sip:b1@{D}".encode(), b"sip:", 1),
            ok.replace(b"CSeq: 1 OPTIONS", b"CSeq: x y"),
            ok.replace(b"Call-ID:", b"Call-ID: a\r\nCall-ID:"),
            ok.replace(b"OPTIONS", b"CANCEL"),
            ok,
        ]
        try:
            for data in bad:
                raw.send(data, proxy_addr(net))
                assert await raw.replies(0.1) == [], data
            counters = dict(net.proxy.status()["counters"])
            assert counters == {"dropped-unregistered": len(bad)}  # nothing even parsed them
            # Recognisably a REGISTER: a malformed one still gets its 400.
            reg = raw.register("a2")
            raw.send(reg.replace(b"Content-Length: 0", b"Content-Length: 999"),
                     proxy_addr(net))
            assert (await raw.statuses())[0].startswith("SIP/2.0 400")
            # Registered, malformed requests are answered, without a traceback.
            raw.send(reg, proxy_addr(net))
            assert await raw.statuses() == ["SIP/2.0 200 OK"]
            for data in bad[6:8]:
                raw.send(data.replace(b"z9hG4bK", b"z9hG4bKx"), proxy_addr(net))
                assert (await raw.statuses())[0].startswith("SIP/2.0 400")
        finally:
            raw.close()

    with caplog.at_level(logging.INFO):
        run(scenario, tmp_path, CONFIG)
    no_errors(caplog)
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert drops and all("unregistered source" in line for line in drops)


def test_drop_lines_are_limited_per_address(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("nodes.proxy_admission.time.monotonic", lambda: now[0])
    book = DropBook()
    assert [book.may_log("10.0.0.1") for _ in range(7)] == [0] * 5 + [None] * 2
    assert book.may_log("10.0.0.2") == 0  # another address has its own share
    now[0] += 1.0
    assert book.may_log("10.0.0.1") == 2  # the next line says how many went unlogged
    data = b"OPTIONS sip:x SIP/2.0\r\n\r\n"
    assert book.first_time(data, ("10.0.0.1", 5060))
    assert not book.first_time(data, ("10.0.0.1", 5060))  # a retransmission
    assert book.first_time(data, ("10.0.0.1", 5070))


def test_bad_routes_and_acks_get_one_line(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(net: Net) -> None:
        carol = await registered(net, "127.0.0.4", "a2")
        try:
            carol.send(carol.request("MESSAGE", f"sip:a2@{D}", frm=f"sip:a2@{D}",
                                     to=f"<sip:a2@{D}>", extra="Route: <tel:+123>\r\n"),
                       proxy_addr(net))
            assert await carol.statuses() == ["SIP/2.0 416 Unsupported URI Scheme in Route"]
            for route in ("<sip:a@b", "<tel:1>"):
                carol.send(carol.request("ACK", "sip:b1@127.0.0.3", frm=f"sip:a2@{D}",
                                         to=f"<sip:b1@{D}>;tag=x", cseq="1 ACK",
                                         extra=f"Route: {route}\r\n"), proxy_addr(net))
                assert await carol.replies() == []
        finally:
            carol.close()
        assert net.proxy.status()["counters"]["dropped-ack"] == 2

    with caplog.at_level(logging.INFO):
        run(scenario, tmp_path, CONFIG)
    no_errors(caplog)
    acks = [r.getMessage() for r in caplog.records if "dropped ACK" in r.getMessage()]
    assert len(acks) == 2 and "malformed" in acks[0], acks


def test_client_written_received_and_rport_are_not_followed(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        raw = RawSip("127.0.0.5")
        victim = RawSip("127.0.0.9")
        try:
            host, port = raw.addr
            via = (f"Via: SIP/2.0/UDP {host}:{port};branch={branch()};"
                   f"received={victim.addr[0]};rport={victim.addr[1]}\r\n")
            req = raw.request("REGISTER", f"sip:{D}", frm=f"sip:a2@{D}", to=f"<sip:a2@{D}>",
                              via=via, extra=f"Contact: <sip:a2@{host}:{port}>\r\n")
            raw.send(req, proxy_addr(net))
            assert await raw.statuses() == ["SIP/2.0 200 OK"]
            assert await victim.replies(0.05) == []
        finally:
            raw.close()
            victim.close()

    run(scenario, tmp_path, CONFIG)


def test_host_name_contacts_are_refused(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        raw = RawSip("127.0.0.5")
        try:
            for contact in ("sip:a2@evil.example", "sip:a2@127.0.0.5.nip.io:5060",
                            "tel:+12345"):
                raw.send(raw.request("REGISTER", f"sip:{D}", frm=f"sip:a2@{D}",
                                     to=f"<sip:a2@{D}>", extra=f"Contact: <{contact}>\r\n"),
                         proxy_addr(net))
                assert (await raw.statuses())[0].startswith("SIP/2.0 400"), contact
        finally:
            raw.close()
        assert net.proxy.status()["registrations"] == {}

    run(scenario, tmp_path, CONFIG)
