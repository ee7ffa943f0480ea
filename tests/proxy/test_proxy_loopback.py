"""Proxy and terminals in one process over real UDP on loopback (open mode).

Register, call, confirm, BYE, MESSAGE; the refusal rules: unregistered source dropped
silently, spoofed From 403, non-friends 403.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from nodes.control import CommandError
from nodes.events import EventLog
from nodes.labconfig import LabConfig
from nodes.proxy import Proxy
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.message import Request
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import TransactionTimeout
from nodes.sip.transport import UdpTransport
from nodes.terminal import Terminal

ROOT = Path(__file__).resolve().parents[2]
T = TimerConfig(t1=0.02, timer_d=0.1)


class ProxyNet(Protocol):
    proxy: Proxy
    terms: dict[str, Terminal]


N = TypeVar("N", bound=ProxyNet)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Net:
    def __init__(self, tmp: Path, config: LabConfig) -> None:
        self.tmp, self.config = tmp, config
        self.proxy = Proxy(config, "127.0.0.1", free_port("127.0.0.1"), "open",
                           EventLog("proxy", str(tmp / "proxy.jsonl")), T)
        self.terms: dict[str, Terminal] = {}

    async def terminal(self, name: str, ip: str) -> Terminal:
        term = Terminal(name, self.config, ip, ("127.0.0.1", self.proxy.port),
                        free_port(ip), EventLog(name, str(self.tmp / f"{name}.jsonl")), T)
        await term.start()
        self.terms[name] = term
        return term


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def drive(make_net: Callable[[], N], scenario: Callable[[N], Awaitable[None]]) -> None:
    """Make a net (a proxy and its terminals) in a new event loop, start its proxy, run the
    scenario, and close its terminals and proxy whatever happens."""
    async def main() -> None:
        net = make_net()
        await net.proxy.start()
        try:
            await scenario(net)
        finally:
            for term in net.terms.values():
                await term.close()
            await net.proxy.close()

    asyncio.run(main())


def run(scenario: Callable[[Net], Awaitable[None]], tmp: Path,
        config: LabConfig | None = None) -> None:
    drive(lambda: Net(tmp, config or LabConfig.load(ROOT / "config" / "lab.json")), scenario)


def test_register_call_bye_message(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        a1 = await net.terminal("a1", "127.0.0.2")
        b1 = await net.terminal("b1", "127.0.0.3")
        assert (await a1.register())["status"] == 200
        assert (await b1.register())["status"] == 200
        regs = net.proxy.status()["registrations"]
        assert set(regs) == {"sip:a1@m2m.example", "sip:b1@m2m.example"}
        result = await a1.call("b1")
        assert result["status"] == 200
        call_id = result["call_id"]
        assert call_id in a1.calls
        await until(lambda: call_id in b1.calls, "b1's confirmed dialog")
        assert (await a1.hangup(call_id))["status"] == 200
        await until(lambda: call_id not in b1.calls, "b1 to see the BYE")
        assert (await a1.message("b1", "hello b1"))["status"] == 200
        assert b1.messages[-1]["text"] == "hello b1"
        assert b1.messages[-1]["from"] == "sip:a1@m2m.example"
        counters = net.proxy.status()["counters"]
        assert counters["fwd-INVITE"] == 1 and counters["fwd-BYE"] == 1
        assert counters["fwd-ACK"] >= 1 and counters["fwd-MESSAGE"] == 1

    run(scenario, tmp_path)


def test_unregistered_source_is_dropped_silently(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        b1 = await net.terminal("b1", "127.0.0.3")
        await b1.register()
        a1 = await net.terminal("a1", "127.0.0.2")  # never registers
        with pytest.raises(CommandError, match="no answer"):
            await a1.call("b1")
        with pytest.raises(CommandError, match="no answer"):
            await a1.message("b1", "let me in")
        counters = net.proxy.status()["counters"]
        assert counters["dropped-unregistered"] == 2  # one per request, retransmits absorbed
        assert counters.get("fwd-INVITE", 0) == 0
        assert b1.calls == {} and b1.messages == []

    run(scenario, tmp_path)


async def _raw_endpoint(ip: str) -> SipEndpoint:
    return SipEndpoint(await UdpTransport.create(ip, free_port(ip)), timers=T)


async def _send(ep: SipEndpoint, net: Net, method: str, frm: str, to: str,
                headers: list[Any] | None = None) -> int:
    req = Request(method, f"sip:{to}@m2m.example", [
        ("From", f"<sip:{frm}@m2m.example>;tag={new_tag()}"), ("To", f"<sip:{to}@m2m.example>"),
        ("Call-ID", f"{new_tag()}@test"), ("CSeq", f"1 {method}"),
        ("Contact", f"<sip:{frm}@{ep.local_addr[0]}:{ep.local_addr[1]}>"), *(headers or [])])
    try:
        return (await ep.request(req, ("127.0.0.1", net.proxy.port))).status
    except TransactionTimeout:
        return 0


def test_unregistered_source_gets_no_answer_to_any_method(tmp_path: Path) -> None:
    """CANCEL, BYE, OPTIONS and a malformed request from an unregistered source: silence
    (the endpoint would answer CANCEL and bad requests itself were it not for the gate)."""
    async def scenario(net: Net) -> None:
        ep = await _raw_endpoint("127.0.0.4")
        try:
            for method in ("CANCEL", "BYE", "OPTIONS"):
                assert await _send(ep, net, method, "a2", "b1") == 0
            bad = await _send(ep, net, "MESSAGE", "a2", "b1", [("Expires", "soon")])
            assert bad == 0  # registered, this would be a 400
            assert await _send(ep, net, "REGISTER", "a2", "a2", [("Expires", "60")]) == 200
            assert await _send(ep, net, "MESSAGE", "a2", "b1", [("Expires", "soon")]) == 400
        finally:
            await ep.close()
        counters = net.proxy.status()["counters"]
        assert counters["dropped-unregistered"] == 4  # one each, retransmissions not counted
        # Dropped before they are parsed: the SIP layer never saw the four.
        assert "rx-CANCEL" not in counters and counters["rx-REGISTER"] == 1

    run(scenario, tmp_path)


def test_spoofed_from_is_403(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        b1 = await net.terminal("b1", "127.0.0.3")
        await b1.register()
        ep = await _raw_endpoint("127.0.0.4")
        try:
            assert await _send(ep, net, "REGISTER", "a2", "a2", [("Expires", "60")]) == 200
            # Registered as a2, claims to be b2.
            assert await _send(ep, net, "MESSAGE", "b2", "b1") == 403
            assert await _send(ep, net, "MESSAGE", "a2", "b1") == 200
        finally:
            await ep.close()
        assert net.proxy.status()["counters"]["forbidden-from"] == 1
        assert [m["from"] for m in b1.messages] == ["sip:a2@m2m.example"]

    run(scenario, tmp_path)


def test_non_friend_call_is_403(tmp_path: Path) -> None:
    data = {
        "domain": "m2m.example",
        "users": {"alice": {"terminals": {"a1": ["audio"]}},
                  "bob": {"terminals": {"b1": ["audio"]}}},
        "friends": [],
        "servers": {"proxy": "10.0.0.10", "sms": "10.0.0.11", "presence": "10.0.0.12"},
    }

    async def scenario(net: Net) -> None:
        a1 = await net.terminal("a1", "127.0.0.2")
        b1 = await net.terminal("b1", "127.0.0.3")
        await a1.register()
        await b1.register()
        assert (await a1.call("b1"))["status"] == 403
        assert (await a1.message("b1", "hi"))["status"] == 403
        assert b1.calls == {} and b1.messages == []
        assert net.proxy.status()["counters"]["forbidden-policy"] == 2

    run(scenario, tmp_path, LabConfig.from_dict(data))

