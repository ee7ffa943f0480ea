"""Calls that go wrong, at real terminals in an in-process lab (tests/smig/harness.py):

* an offer the callee cannot use gets 488 with the reason, before anything is set up, and
  leaves nothing behind (no session, no socket, no SA); a re-INVITE likewise;
* an answer the caller cannot use: the 2xx is ACKed, the call ended with a BYE, and the
  command says why;
* a 2xx that is never acknowledged ends the call with a BYE (RFC 3261 §13.3.1.4), media and
  media SAs freed;
* shutdown with a dead peer: the BYEs go out in parallel and give up after CLOSE_BYE_WAIT,
  and every SA goes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nodes.control import CommandError
from nodes.mediakeys import M2mKey
from nodes.mediasession import MediaSession
from nodes.sip.timers import TimerConfig
from nodes.terminal import CLOSE_BYE_WAIT, Terminal
from tests.smig.harness import ROOT, Net, RawSip, open_fds, request, run, sdp, until

KEY = "AAECAwQFBgcICQoLDA0ODw==;spi=4096;ealg=aes-cbc;alg=hmac-sha-256-128"


def tamper(term: Terminal, edit: Callable[[MediaSession], None]) -> None:
    """The terminal's next media sessions get `edit` applied (a hand-made SDP or key)."""
    make = term._media_session

    def patched(*args: object) -> MediaSession:
        session = make(*args)  # type: ignore[arg-type]
        edit(session)
        return session

    term._media_session = patched  # type: ignore[method-assign]


def sdp_edit(old: str, new: str) -> Callable[[MediaSession], None]:
    def edit(session: MediaSession) -> None:
        sdp_of = session.sdp
        session.sdp = lambda: sdp_of().replace(old.encode(), new.encode())  # type: ignore
    return edit


def media_sas(net: Net, name: str) -> list[int]:
    term = net.terms[name]
    reg = {sa.spi for c in term.channels.values() for sa in c.saset.sas}
    return [sa.spi for sa in net.backends[name].list_sas() if sa.spi not in reg]


BAD_OFFERS = [
    ("c=IN IP4 {ip}", "c=IN IP4 no.such.host", "not an IPv4 address"),
    ("c=IN IP4 {ip}", "c=IN IP6 ::1", "must be IN IP4"),
    ("c=IN IP4 {ip}", "c=IN IP4 0.0.0.0", "not a unicast address"),
    ("c=IN IP4 {ip}", "c=IN IP4 255.255.255.255", "not a unicast address"),
    ("c=IN IP4 {ip}", "c=IN IP4 239.1.2.3", "not a unicast address"),
    ("m=audio {port} ", "m=video {port} ", "does not do video"),
    ("m=audio {port} ", "m=audio 0 ", "port 0"),
    ("ealg=aes-cbc", "ealg=null", "uses null/hmac-sha-256-128"),
]


@pytest.mark.parametrize("mode", ["open", "ipsec-m2ms"])
def test_unusable_offers_get_488_and_leave_nothing(tmp_path: Path, mode: str) -> None:
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        await a1.call("b1")  # a call of each first: sockets and SAs in use, counted below
        await b1.call("a1")
        fds, sas = open_fds(), sorted(media_sas(net, "b1")) if mode != "open" else []
        for old, new, why in BAD_OFFERS:
            if "ealg" in old and mode == "open":
                continue  # no keys in open mode
            a1._media_session = Terminal._media_session.__get__(a1)  # type: ignore
            tamper(a1, lambda s, old=old, new=new: sdp_edit(
                old.format(ip=a1.local_ip, port=s.local_port),
                new.format(ip=a1.local_ip, port=s.local_port))(s))
            result = await a1.call("b1")
            assert result["status"] == 488, (new, result)
            assert why in result["warning"], (new, result)
        assert len(b1.calls) == 2 and len(b1.media) == 2
        assert b1.counters["refused-sdp"] == sum(1 for o, _, _ in BAD_OFFERS
                                                 if mode != "open" or "ealg" not in o)
        assert open_fds() - fds == set()  # no receiver socket left at b1 (nor at a1)
        if mode != "open":
            assert sorted(media_sas(net, "b1")) == sas

    run(scenario, tmp_path, mode)


def test_bad_answer_is_acked_then_ended_with_bye(tmp_path: Path) -> None:
    """The callee answers with c=evil.invalid: the caller used to report an internal
    error and keep a confirmed dialog nobody would BYE."""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        tamper(b1, sdp_edit(f"c=IN IP4 {b1.local_ip}", "c=IN IP4 evil.invalid"))
        fds = open_fds()
        with pytest.raises(CommandError, match=r"unusable answer \(SDP c= address "
                           r"'evil.invalid' is not an IPv4 address\); the call is ended "
                           r"\(BYE: 200\)"):
            await a1.call("b1")
        assert a1.calls == {} and a1.media == {}
        await until(lambda: not b1.calls and not b1.media, "b1 to get the BYE")
        assert media_sas(net, "a1") == [] and media_sas(net, "b1") == []
        assert open_fds() - fds == set()

    run(scenario, tmp_path, "ipsec-m2ms")


def test_bad_reinvite_gets_488_and_changes_nothing(tmp_path: Path) -> None:
    """Re-INVITE with a bad c= or port 0 used to get 200 and then fail, leaving the remote
    at :0 while the sender still sent to the old port."""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        cid = (await a1.call("b1"))["call_id"]
        await until(lambda: cid in b1.calls, "b1's dialog")
        session = b1.media[cid]
        before, sas = session.status()["remote"], sorted(media_sas(net, "b1"))
        key = M2mKey.fresh().serialize()
        for body in (sdp("no.such.host", key=key), sdp(a1.local_ip, port=0, key=key),
                     sdp(a1.local_ip, key=key.replace("aes-cbc", "null")),
                     sdp(a1.local_ip, kind="video", key=key), "", "v=0\nbroken\n"):
            resp = await a1._ua().request(a1.calls[cid], "INVITE", body=body.encode(),
                                          content_type="application/sdp" if body else None)
            assert resp.status == 488, body
        assert session.status()["remote"] == before and b1.media[cid] is session
        assert sorted(media_sas(net, "b1")) == sas
        assert session.sender is not None
        assert f"{session.sender.remote[0]}:{session.sender.remote[1]}" == before

    run(scenario, tmp_path, "ipsec-m2ms")


@pytest.mark.parametrize("mode", ["open", "ipsec-m2ms"])
def test_unacknowledged_2xx_ends_the_call(tmp_path: Path, mode: str) -> None:
    """The caller never ACKs: after Timer L (64*T1) the callee BYEs and frees everything.
    It used to keep the dialog, the media session (two sockets) and the media SAs."""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        a1._ua()._ack = lambda *args: None  # type: ignore[method-assign]
        fds = open_fds()
        cid = (await a1.call("b1"))["call_id"]
        assert cid in b1.calls and cid in b1.media
        await until(lambda: cid not in b1.calls and cid not in b1.media,
                    "b1 to end the call", timeout=5)
        await until(lambda: cid not in a1.calls, "a1 to get the BYE")
        assert b1.counters["ack-timeout"] == 1
        # The call's end frees its SAs and sockets as its BYE is handled: poll, not peek.
        if mode != "open":
            await until(lambda: media_sas(net, "b1") == [] and media_sas(net, "a1") == [],
                        "both ends' media SAs to go")
        await until(lambda: open_fds() - fds == set(), "the call's sockets to close")

    run(scenario, tmp_path, mode)


@pytest.mark.parametrize("mode", ["open", "ipsec-m2ms"])
def test_acknowledged_2xx_is_kept(tmp_path: Path, mode: str) -> None:
    """(In ipsec-m2ms mode the ACK comes over the protected channel from the proxy's
    port-c: the only source the callee's protected port takes requests from.)"""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        cid = (await a1.call("b1"))["call_id"]
        await asyncio.sleep(64 * 0.02 + 0.5)  # past Timer L
        assert cid in b1.calls and cid in a1.calls and b1.counters["ack-timeout"] == 0
        assert b1.counters.get("dropped-not-proxy", 0) == 0

    run(scenario, tmp_path, mode)


def test_unacknowledged_2xx_from_a_raw_caller(tmp_path: Path) -> None:
    """Open mode, a hand-made INVITE straight at the terminal that never ACKs: the BYE goes
    to the caller's Contact after Timer L."""
    async def scenario(net: Net) -> None:
        b1 = await net.terminal("b1")
        raw = RawSip(net.ip(99))
        try:
            raw.send(request("INVITE", f"sip:b1@{b1.local_ip}", "sip:a1@m2m.example",
                             "sip:b1@m2m.example", sdp(raw.addr[0]), "application/sdp"),
                     (b1.local_ip, 5060))
            got = await raw.replies(64 * 0.02 + 1.0)
            assert "SIP/2.0 200 OK" in got and got[-1].startswith("BYE ")
        finally:
            raw.close()
        assert b1.calls == {} and b1.media == {}

    run(scenario, tmp_path, "open")


# Timer F (64*T1) far beyond CLOSE_BYE_WAIT: a close that waits the BYEs out cannot finish
# within the tests' generous bound, one that gives them up does (no timing assertion needed).
SLOW = TimerConfig(t1=0.5, timer_d=0.1)
assert SLOW.f > 30 * CLOSE_BYE_WAIT


def test_close_with_a_dead_peer_gives_the_byes_up_and_removes_every_sa(tmp_path: Path) -> None:
    """Three calls to a peer that has gone silent: the BYEs run in parallel and are given up
    after CLOSE_BYE_WAIT (one after the other, each waiting Timer F, took 3 × 64*T1 and 14 s in
    the lab); media and registration SAs are all removed."""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        for _ in range(3):
            await a1.call("b1")
        assert len(a1.calls) == 3 and len(net.backends["a1"].sad) == 4 + 3 * 2
        for ep in (b1.channel.ep_s, b1.channel.ep_c, b1.plain):  # type: ignore[union-attr]
            ep.transport.set_receiver(lambda _data, _source: None)  # b1 hears nothing more
        await asyncio.wait_for(a1.close(), SLOW.f / 3)  # Timer F would be 3 × longer
        assert net.backends["a1"].sad == {} and net.backends["a1"].spd == {}
        assert a1.calls == {} and a1.media == {}

    run(scenario, tmp_path, "ipsec-m2ms", timers=SLOW)


async def _control(path: Path, **request: object) -> dict:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(json.dumps(request).encode() + b"\n")
    reply = json.loads(await reader.readline())
    writer.close()
    return reply


def test_sigterm_with_a_dead_peer_exits_quickly(tmp_path: Path) -> None:
    """The node program end to end: three calls to a peer that has died, then SIGTERM (what
    the lab sends at teardown, with 3 s before SIGKILL). The BYEs went one after another,
    each until the proxy's 408 or Timer F (64*T1 = 32 s here); now the terminal is gone in
    about CLOSE_BYE_WAIT, long before the first of them."""
    async def scenario(net: Net) -> None:
        b1 = await net.terminal("b1")
        config, sock = tmp_path / "lab.json", tmp_path / "a1.sock"
        config.write_text(json.dumps(net.config_data))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nodes.terminal", "--mode", "open", "--name", "a1",
            "--local", net.ip(40), "--proxy", net.ip(10), "--config", str(config),
            "--control", str(sock), "--t1", str(SLOW.t1), "--events", str(tmp_path / "a1-p.jsonl"),
            cwd=ROOT)
        try:
            await until(sock.exists, "a1's control socket", timeout=20)
            assert (await _control(sock, cmd="register"))["result"]["status"] == 200
            for _ in range(3):
                assert (await _control(sock, cmd="call", to="b1"))["result"]["status"] == 200
            b1.plain.transport.set_receiver(lambda _data, _source: None)  # b1 has died
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), SLOW.f / 3) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        events = [json.loads(line)["event"]
                  for line in (tmp_path / "a1-p.jsonl").read_text().splitlines()]
        assert events.count("call-ended") == 3 and events[-1] == "terminal-stopped"

    run(scenario, tmp_path, "open", timers=SLOW)


def test_a_call_after_a_link_switch_takes_its_media_on_the_active_interface(
        tmp_path: Path) -> None:
    """A1 registered through its second interface (Fig 4 moved it there): a new call offers
    and receives media on that address, not on the one the terminal started with."""
    async def scenario(net: Net) -> None:
        second = net.ip(99)
        a1 = await net.terminal("a1", interfaces={"a1-wlan": net.ip(net._next),
                                                  "a1-lte": second})
        b1 = await net.terminal("b1")
        assert (await a1.register(via="a1-lte"))["status"] == 200
        assert a1.active_ip == second and a1.status()["active"] == "a1-lte"
        cid = (await a1.call("b1"))["call_id"]
        await until(lambda: cid in b1.media, "b1's media session")
        assert b1.media[cid].status()["remote"].startswith(second + ":")
        assert a1.media[cid].status()["local"].startswith(second + ":")

    run(scenario, tmp_path, "ipsec-m2ms")
