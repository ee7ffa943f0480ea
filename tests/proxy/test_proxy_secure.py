"""The proxy in ipsec-m2ms mode with an in-memory IPsec backend, terminals in-process, all
on loopback UDP (the SAs are bookkeeping: nothing is encrypted, but every message takes the
ports Fig 1 gives it). Registration robustness (pending SAs never leak, bounded per source
and in all, SPIs reused, another terminal's AOR) and the policy over protected channels.

Config: alice (a1), bob (b1), carol (a2); only alice and bob are friends.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from nodes.control import CommandError
from nodes.events import EventLog
from nodes.labconfig import Credentials
from nodes.proxy import Proxy
from nodes.secreg import MAX_PENDING, MAX_PENDING_PER_IP, RegistrationError, SecRegClient
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.message import Request
from nodes.sip.secagree import offer, serialize_mechanisms
from nodes.sip.transport import UdpTransport
from nodes.terminal import Terminal
from tests.fakeipsec import MemoryBackend, memory_ipsec
from tests.proxy.rawsip import RawSip, branch
from tests.proxy.test_proxy_loopback import ROOT, T, drive, free_port, until
from tests.proxy.test_proxy_policy import CONFIG, D

pytestmark = pytest.mark.timeout(60)
CREDS = Credentials.load(ROOT / "config" / "credentials.json")
# SecRegClient starts Fig 1 at port 5060, so the proxy listens there, on an address of its
# own (random: another test run may have its proxy up at the same time).
PROXY_IP = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.1"


class SecureNet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proxy = Proxy(CONFIG, PROXY_IP, 5060, "ipsec-m2ms",
                           EventLog("proxy", str(tmp / "proxy.jsonl")), T, CREDS,
                           memory_ipsec("proxy"),
                           protected_ports=(free_port(PROXY_IP), free_port(PROXY_IP)))
        self.terms: dict[str, Terminal] = {}

    @property
    def addr(self) -> tuple[str, int]:
        return PROXY_IP, self.proxy.port

    @property
    def sas(self) -> list[Any]:
        assert self.proxy.ipsec is not None
        return self.proxy.ipsec.backend.list_sas()

    async def terminal(self, name: str, ip: str) -> Terminal:
        term = Terminal(name, CONFIG, ip, self.addr, free_port(ip),
                        EventLog(name, str(self.tmp / f"{name}.jsonl")), T, mode="ipsec-m2ms",
                        psk=CREDS.psk(name), ipsec=memory_ipsec(name))
        await term.start()
        self.terms[name] = term
        return term


def run(scenario: Callable[[SecureNet], Awaitable[None]], tmp: Path) -> None:
    drive(lambda: SecureNet(tmp), scenario)


def security_client(spi_c: int, spi_s: int, port_c: int, port_s: int) -> str:
    return serialize_mechanisms(offer(spi_c, spi_s, port_c, port_s))


def unprotected_register(raw: RawSip, user: str, sec_client: str) -> bytes:
    return raw.register(user, extra=f"Security-Client: {sec_client}\r\n"
                        "Require: sec-agree\r\nProxy-Require: sec-agree\r\n")


def test_secure_register_call_message_bye(tmp_path: Path) -> None:
    async def scenario(net: SecureNet) -> None:
        a1 = await net.terminal("a1", "127.0.0.2")
        b1 = await net.terminal("b1", "127.0.0.3")
        for t in (a1, b1):
            assert (await t.register())["status"] == 200
        assert len(net.sas) == 8 and net.proxy.status()["pending"] == 0
        call = await a1.call("b1")
        assert call["status"] == 200
        cid = call["call_id"]
        await until(lambda: cid in b1.calls, "b1's dialog")
        assert (await b1.hangup(cid))["status"] == 200  # the callee's BYE: the route set
        assert (await a1.message("b1", "hi"))["status"] == 200
        assert net.proxy.status()["counters"]["fwd-ACK"] >= 1

    run(scenario, tmp_path)


def test_non_friend_cannot_reach_a_registered_contact(tmp_path: Path) -> None:
    async def scenario(net: SecureNet) -> None:
        b1 = await net.terminal("b1", "127.0.0.3")
        a2 = await net.terminal("a2", "127.0.0.4")  # carol
        for t in (b1, a2):
            await t.register()
        assert b1.channel is not None
        contact = f"sip:b1@127.0.0.3:{b1.channel.ep_s.local_addr[1]}"
        assert (await a2.call(contact))["status"] == 403
        assert (await a2.message(contact, "x"))["status"] == 403
        assert (await a2.call("b1"))["status"] == 403
        assert b1.calls == {} and b1.messages == []

    run(scenario, tmp_path)


def test_nested_link_switch_body_is_400_and_leaves_no_sa(tmp_path: Path) -> None:
    async def scenario(net: SecureNet) -> None:
        a1 = await net.terminal("a1", "127.0.0.2")
        with pytest.raises(CommandError, match="registration refused: 400"):
            await a1.register(body="[" * 3000 + "]" * 3000)
        await until(lambda: net.sas == [], "the pending SAs to go")
        status = net.proxy.status()
        assert status["pending"] == 0 and status["registrations"] == {}
        assert (await a1.register())["status"] == 200  # and nothing is in the way after

    run(scenario, tmp_path)


def test_any_failure_after_verification_leaves_no_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(net: SecureNet) -> None:
        a1 = await net.terminal("a1", "127.0.0.2")

        def broken(*_a: object, **_k: object) -> int:
            raise RuntimeError("a bug in the registrar")

        monkeypatch.setattr(net.proxy.registration, "_bind", broken)
        with pytest.raises(CommandError, match="registration refused: 500"):
            await a1.register()
        await until(lambda: net.sas == [], "the pending SAs to go")
        assert net.proxy.status()["pending"] == 0 and net.proxy.secreg.assocs == {}

    run(scenario, tmp_path)


def test_pending_associations_are_bounded(tmp_path: Path) -> None:
    """One host's flood of Security-Client REGISTERs keeps MAX_PENDING_PER_IP pending (a new
    one replaces the oldest); many hosts' fill MAX_PENDING, beyond which the answer is 503
    with Retry-After. A terminal still registers afterwards."""
    async def scenario(net: SecureNet) -> None:
        backend = net.proxy.ipsec.backend
        assert isinstance(backend, MemoryBackend)
        flood = RawSip("127.0.0.5")
        try:
            for i in range(200):
                flood.send(unprotected_register(flood, "a2", security_client(
                    10000 + 2 * i, 10001 + 2 * i, 20000 + i, 30000 + i)), net.addr)
                if i % 50 == 49:
                    await flood.replies(0.05)
            await until(lambda: net.proxy.counters["rx-REGISTER"] == 200, "the flood")
            assert net.proxy.status()["pending"] == MAX_PENDING_PER_IP
            assert len(net.sas) == 4 * MAX_PENDING_PER_IP
        finally:
            flood.close()
        hosts = [RawSip(f"127.0.1.{i}") for i in range(1, MAX_PENDING + 4)]
        try:
            for raw in hosts:
                raw.send(unprotected_register(raw, "a2", security_client(
                    5000, 5001, 20000, 30000)), net.addr)
            answers = [(await raw.replies(0.0)) for raw in hosts]
            await hosts[-1].replies(0.3)
            answers = [a or await raw.replies(0.0) for a, raw in zip(answers, hosts,
                                                                      strict=True)]
        finally:
            for raw in hosts:
                raw.close()
        firsts = [a[0].split(b"\r\n", 1)[0] for a in answers]
        busy = [a[0] for a in answers if a[0].startswith(b"SIP/2.0 503")]
        assert firsts.count(b"SIP/2.0 401 Unauthorized") == MAX_PENDING - MAX_PENDING_PER_IP
        assert len(busy) == len(hosts) - (MAX_PENDING - MAX_PENDING_PER_IP)
        assert all(b"Retry-After: " in b for b in busy)
        assert net.proxy.status()["pending"] == MAX_PENDING
        await until(lambda: net.proxy.status()["pending"] == 0, "the pending to expire", 10)
        a1 = await net.terminal("a1", "127.0.0.2")
        assert (await a1.register())["status"] == 200

    run(scenario, tmp_path)


def test_reused_spis_from_a_new_port_are_400_and_install_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(net: SecureNet) -> None:
        raw = RawSip("127.0.0.5")
        try:
            raw.send(unprotected_register(raw, "a2", security_client(1111, 2222, 5100, 5101)),
                     net.addr)
            assert (await raw.statuses())[0] == "SIP/2.0 401 Unauthorized"
            sas = len(net.sas)
            raw.send(unprotected_register(raw, "a2", security_client(1111, 2222, 5200, 5201)),
                     net.addr)
            assert await raw.statuses() == ["SIP/2.0 400 Security-Client SPIs already in use"]
            assert len(net.sas) == sas == 4 and net.proxy.status()["pending"] == 1
            # The same attempt again from the same port-c replaces its pending one.
            raw.send(unprotected_register(raw, "a2", security_client(1111, 2222, 5100, 5101)),
                     net.addr)
            assert (await raw.statuses())[0] == "SIP/2.0 401 Unauthorized"
            assert len(net.sas) == 4
        finally:
            raw.close()

    with caplog.at_level(logging.INFO):
        run(scenario, tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_channel_registers_only_its_own_terminal(tmp_path: Path) -> None:
    """a2 authenticates with its own PSK but asks for b1's AOR (To): 403, and no SA stays;
    over an established channel, a refresh naming b1 is 403 too."""
    async def scenario(net: SecureNet) -> None:
        b1 = await net.terminal("b1", "127.0.0.3")
        await b1.register()
        before = {sa.spi for sa in net.sas}
        ipsec = memory_ipsec("a2")
        psk = CREDS.psk("a2")
        assert psk is not None
        client = SecRegClient(ipsec, f"sip:a2@{D}", psk, "127.0.0.4", PROXY_IP,
                              EventLog("a2", str(net.tmp / "a2.jsonl")),
                              lambda t: SipEndpoint(t, timers=T))
        plain = SipEndpoint(await UdpTransport.create("127.0.0.4", free_port("127.0.0.4")),
                            timers=T)
        cseq = [0]

        def build(aors: list[str], contact: tuple[str, int]) -> Request:
            """The REGISTERs name these AORs in turn (the last one from then on)."""
            cseq[0] += 1
            aor = aors[min(cseq[0], len(aors)) - 1]
            return Request("REGISTER", f"sip:{D}", [
                ("From", f"<{aor}>;tag={new_tag()}"), ("To", f"<{aor}>"),
                ("Call-ID", "hijack@a2"), ("CSeq", f"{cseq[0]} REGISTER"),
                ("Contact", f"<sip:x@{contact[0]}:{contact[1]}>"), ("Expires", "300")])

        try:
            # b1 from the start (b1's PSK is not a2's: the Digest fails), and a2 in the
            # challenged REGISTER but b1 in the protected one (Digest fine, To not).
            for aors in ([f"sip:b1@{D}"], [f"sip:a2@{D}", f"sip:b1@{D}"]):
                cseq[0] = 0
                with pytest.raises(RegistrationError, match="refused: 403"):
                    await client.register(plain, partial(build, aors), 300, set())
                await until(lambda: {sa.spi for sa in net.sas} == before, "a2's SAs to go")
            cseq[0] = 0
            channel, resp = await client.register(plain, partial(build, [f"sip:a2@{D}"]),
                                                  300, set())
            assert resp.status == 200
            refresh = build([f"sip:b1@{D}"], channel.ep_s.local_addr)
            for name in ("Require", "Proxy-Require"):
                refresh.add(name, "sec-agree")
            assert (await channel.ep_c.request(refresh, channel.proxy_hop)).status == 403
            regs = net.proxy.status()["registrations"]
            assert [r["source"][0] for r in regs[f"sip:b1@{D}"]] == ["127.0.0.3"]
            await client.close_channel(channel)
        finally:
            await plain.close()

    run(scenario, tmp_path)


def test_forged_response_never_enters_a_channel(tmp_path: Path) -> None:
    """The lab's attack: a plaintext 200 to port 5060 from a host with no registration,
    its second Via naming a1's protected port-c. Also: a registered terminal's response
    on the protected server port (it only ever answers on the client port)."""
    async def scenario(net: SecureNet) -> None:
        a1 = await net.terminal("a1", "127.0.0.2")
        await a1.register()
        assert a1.channel is not None
        port_c = a1.channel.ep_c.local_addr[1]
        seen: list[object] = []
        a1.channel.ep_c.stray_response_handler = lambda r, _a: seen.append(r)
        forged = (f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {PROXY_IP}:{net.proxy.port};"
                  f"branch={branch()}\r\nVia: SIP/2.0/UDP 127.0.0.2:{port_c};"
                  f"branch={branch()}\r\nFrom: <sip:b1@{D}>;tag=1\r\nTo: <sip:a1@{D}>;tag=2"
                  "\r\nCall-ID: forged@x\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n")
        stranger = RawSip("127.0.0.5")
        try:
            stranger.send(forged.encode(), net.addr)
            a1.channel.ep_c.transport.send(forged.encode(),
                                           (PROXY_IP, net.proxy.protected_ports[0]))
            await asyncio.sleep(0.3)
        finally:
            stranger.close()
        assert seen == []
        assert net.proxy.status()["counters"]["dropped-response"] == 2

    run(scenario, tmp_path)
