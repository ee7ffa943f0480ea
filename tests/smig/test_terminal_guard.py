"""Who may drive a terminal: in ipsec-m2ms mode requests come only over the protected
channel from the proxy (port 5060 takes only the answers to its own REGISTER), and SMIG
messages only from the session management server (presence results from presence). What a
SMIG message asks for is checked before anything changes.

In-process labs over loopback (tests/smig/harness.py); the secure lab shows the same for
port 5060 with real ESP (tests/lab/test_secure_lab.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from nodes import smig
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.message import Request
from nodes.sip.transport import UdpTransport
from nodes.terminal import Terminal
from tests.smig.harness import Net, RawSip, T, request, run, sdp, until

KEY = "AAECAwQFBgcICQoLDA0ODw==;spi=4096;ealg=aes-cbc;alg=hmac-sha-256-128"


def media_sas(net: Net, name: str) -> int:
    """SAs a terminal has besides its four registration SAs."""
    term = net.terms[name]
    reg = {sa.spi for c in term.channels.values() for sa in c.saset.sas}
    return sum(1 for sa in net.backends[name].list_sas() if sa.spi not in reg)


def test_ipsec_terminal_drops_unprotected_requests(tmp_path: Path) -> None:
    """The breaker's attack: from a host with no SAs, a plaintext INVITE claiming to be a1
    (answered 200, media keyed from the attacker's nonce) and a SMIG `end` for the live call
    (killed it). Now: no answer at all, counted, nothing changes."""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        cid = (await a1.call("b1"))["call_id"]
        await until(lambda: cid in b1.calls, "b1's dialog")
        session = b1.media[cid]
        sas_before = set(net.backends["b1"].sad)
        raw = RawSip(net.ip(99))
        plain = (b1.local_ip, 5060)
        port_s = b1.channel.ep_s.local_addr  # type: ignore[union-attr]
        try:
            for to in (plain, port_s):
                raw.send(request("INVITE", f"sip:b1@{b1.local_ip}", "sip:a1@m2m.example",
                                 "sip:b1@m2m.example", sdp(raw.addr[0], key=KEY),
                                 "application/sdp"), to)
                raw.send(request("MESSAGE", f"sip:b1@{b1.local_ip}", "sip:sms@m2m.example",
                                 "sip:b1@m2m.example", json.dumps({"type": "end",
                                                                   "session": cid}),
                                 smig.CONTENT_TYPE), to)
                raw.send(request("ACK", f"sip:b1@{b1.local_ip}", "sip:a1@m2m.example",
                                 "sip:b1@m2m.example", call_id=cid), to)
                raw.send("OPTIONS sip:b1 SIP/2.0\nVia: SIP/2.0/UDP {src}:{sport}\n"
                         "Bad header line\n\n", to)  # does not parse: not even a 400
            assert await raw.replies(0.5) == []
        finally:
            raw.close()
        assert list(b1.calls) == [cid] and b1.media[cid] is session
        assert session.sender is not None and set(net.backends["b1"].sad) == sas_before
        assert b1.counters["dropped-unprotected"] == 4
        assert b1.counters["dropped-not-proxy"] == 4
        assert b1.counters["rx-INVITE"] == 1  # a1's call only: nothing reached the UA core
        assert (await a1.hangup(cid))["status"] == 200  # over the channel, from the proxy
        await until(lambda: not b1.calls, "the BYE at b1")
        # port 5060 still takes the answers to b1's own REGISTER (Fig 1 step 1)
        assert (await b1.register())["status"] == 200

    run(scenario, tmp_path, "ipsec-m2ms")


def test_open_mode_plain_port_still_takes_requests(tmp_path: Path) -> None:
    """Open mode is open (SIPp interop, the bench): the plain port answers as before."""
    async def scenario(net: Net) -> None:
        b1 = await net.terminal("b1")
        raw = RawSip(net.ip(99))
        try:
            raw.send(request("OPTIONS", f"sip:b1@{b1.local_ip}", "sip:a1@m2m.example",
                             "sip:b1@m2m.example"), (b1.local_ip, 5060))
            assert await raw.replies(0.3) == ["SIP/2.0 200 OK"]
        finally:
            raw.close()

    run(scenario, tmp_path, "open")


async def _as_server(net: Net, server: str, to: Terminal, body: dict | bytes) -> int:
    """A SMIG MESSAGE to a terminal through the proxy, from a server's address and AOR."""
    ep = SipEndpoint(await UdpTransport.create(net.ip(11 if server == "sms" else 12), 5060),
                     timers=T)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = Request("MESSAGE", to.aor, [
        ("From", f"<sip:{server}@m2m.example>;tag={new_tag()}"), ("To", f"<{to.aor}>"),
        ("Call-ID", f"{new_tag()}@{server}"), ("CSeq", "1 MESSAGE"),
        ("Content-Type", smig.CONTENT_TYPE)], data)
    try:
        return (await ep.request(req, (net.ip(10), 5060))).status
    finally:
        await ep.close()


def _session_config(cid: str, **fields: object) -> dict:
    return {"type": "session-config", "session": cid, "terminal": "b1", "media": "audio",
            "role": "answerer", "local-port": 41000, "peer-terminal": "a2",
            "peer-address": "127.0.0.56", "peer-port": 41000, "method": "reuse", **fields}


def test_smig_from_another_terminal_is_403(tmp_path: Path) -> None:
    """A friend's terminal sends b1 a session-config (key reuse, no keys) for b1's call:
    b1 used to close the call's media first and then fail. Now 403, nothing touched."""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        a2 = await net.terminal("a2")
        cid = (await a1.call("b1"))["call_id"]
        await until(lambda: cid in b1.calls, "b1's dialog")
        session = b1.media[cid]
        for body in (_session_config(cid), {"type": "end", "session": cid}):
            resp = await a2._ua().message(b1.aor, a2._proxy_hop(),
                                          json.dumps(body).encode(), smig.CONTENT_TYPE)
            assert (resp.status, resp.reason) == (403, "SMIG only from the session "
                                                  "management server")
        assert b1.media[cid] is session and session.sender is not None
        assert b1.counters["smig-refused-403"] == 2
        # presence results only from presence; the rest only from the SMS
        assert await _as_server(net, "sms", b1, {
            "type": "presence-result", "session": "q-1", "user": "bob",
            "terminals": []}) == 403
        assert await _as_server(net, "presence", b1, {"type": "end", "session": cid}) == 403
        assert b1.media[cid] is session

    run(scenario, tmp_path, "open")


def test_bad_smig_from_the_sms_changes_nothing(tmp_path: Path) -> None:
    """Even from the SMS, what cannot be used is refused before the 200 and before any
    state changes: the live call keeps its media and its SAs."""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        cid = (await a1.call("b1"))["call_id"]
        await until(lambda: cid in b1.calls and b1.media[cid].sender is not None, "b1")
        session = b1.media[cid]
        sas = dict(net.backends["b1"].sad)
        before = session.status()
        keys = b1.smig.export(cid)
        # Refusals: 400 where smig.parse already sees the problem, 488 where only the
        # terminal can (its capabilities, its addresses, the keys' lengths).
        bad = (400, 488)
        cases: list[tuple[dict | bytes, tuple[int, ...]]] = [
            (_session_config(cid), (488,)),  # key reuse without keys
            (_session_config(cid, security={"offer": 5, "answer": 5},  # AttributeError once
                             keys=keys["keys"]), bad),
            (_session_config(cid, security=keys["security"],
                             keys={"offer-to-answer": {"enc": "00", "auth": "00"},
                                   "answer-to-offer": {"enc": "00", "auth": "00"}}), (488,)),
            (_session_config(cid, **{"peer-address": "garbage"}, **keys), bad),
            (_session_config(cid, **{"peer-address": "255.255.255.255"}, **keys), (488,)),
            (_session_config(cid, media="video", **keys), (488,)),  # b1 is audio-only
            (_session_config(cid, terminal="b2", **keys), (488,)),
            ({"type": "link-config", "session": cid, "terminal": "a1",
              "address": "garbage", "old-address": a1.local_ip}, bad),
            ({"type": "link-config", "session": cid, "terminal": "a1",
              "address": "224.0.0.1", "old-address": a1.local_ip}, (488,)),
            ({"type": "link-config", "session": cid, "terminal": "b1",  # not b1's address
              "address": "127.0.0.99", "old-address": b1.local_ip}, (488,)),
            ({"type": "link-config", "session": "nope", "terminal": "a1",
              "address": "127.0.0.99", "old-address": a1.local_ip}, (481,)),
            ({"type": "rekey", "session": cid, "phase": "offer", "terminal": "a1",
              "key": "zz"}, bad),
            (b"{not json", (400,)),
        ]
        refused = 0
        for body, expected in cases:
            status = await _as_server(net, "sms", b1, body)
            assert status in expected, (status, body)
            refused += status == 488
        # well-formed but out of turn: the 200 goes out, the failure is one line, no change
        assert await _as_server(net, "sms", b1, {"type": "rekey", "session": cid,
                                                 "phase": "commit", "terminal": "a1"}) == 200
        assert b1.counters["smig-refused-488"] == refused
        assert b1.media[cid] is session and session.status()["remote"] == before["remote"]
        assert dict(net.backends["b1"].sad) == sas
        assert session.sender is not None
        assert session.sender.remote == (a1.local_ip, a1.media[cid].local_port)

    run(scenario, tmp_path, "ipsec-m2ms")
