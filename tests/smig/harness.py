"""A whole lab in one process over loopback UDP, for the terminal tests: the real proxy,
terminals and (optionally) SMS and presence, in open or ipsec-m2ms mode.

In ipsec-m2ms mode every node gets a `MemoryBackend`: SAs and policies are installed and
removed exactly as in the lab (Fig 1 and Fig 2 run in full, keys derived, the proxy checks
sources and From), but nothing is encrypted, so the packets travel as plain UDP. That shows
what each node installs and what it leaves behind, and what a terminal does with requests
from where they must not come. Each `Net` takes its own 127.x.y.0/24, so tests need no
lock and nothing else on the machine is disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import Credentials, LabConfig
from nodes.presence import Presence
from nodes.proxy import Proxy
from nodes.sip.timers import TimerConfig
from nodes.sms import SessionManager
from nodes.terminal import Terminal
from tests.fakeipsec import MemoryBackend

ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS = ROOT / "config" / "credentials.json"
T = TimerConfig(t1=0.02, timer_d=0.1)  # Timer F and L: 64*T1 = 1.28 s


def open_fds() -> set[str]:
    """What this process has open (sockets by inode): `open_fds() - before` is what a test
    left open (a count would also see an earlier test's sockets the GC closes meanwhile)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, gone by now
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


class Net:
    """Proxy at .10 (port 5060, as Fig 1 wants it), SMS .11, presence .12; terminals from
    .21 on. `mode`: open or ipsec-m2ms."""

    def __init__(self, tmp: Path, mode: str = "open", servers: bool = False,
                 users: dict[str, Any] | None = None, timers: TimerConfig = T) -> None:
        self.tmp, self.mode, self.timers = tmp, mode, timers
        self.base = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}"
        self.config_data: dict[str, Any] = {
            "domain": "m2m.example",
            "users": users or {
                "alice": {"terminals": {"a1": ["audio"], "a2": ["audio", "video"]}},
                "bob": {"terminals": {"b1": ["audio"], "b2": ["audio", "video"]}},
                "carol": {"terminals": {"c1": ["audio"]}}},
            "friends": [["alice", "bob"]],
            "servers": {"proxy": self.ip(10), "sms": self.ip(11), "presence": self.ip(12)}}
        self.config = LabConfig.from_dict(self.config_data)
        self.creds = Credentials.load(CREDENTIALS)
        self.backends: dict[str, MemoryBackend] = {}
        self.proxy = Proxy(self.config, self.ip(10), 5060, mode, self.events("proxy"), timers,
                           creds=self.creds if mode == "ipsec-m2ms" else None,
                           ipsec=self._ipsec("proxy"), notify=servers)
        self.servers = [SessionManager(self.config, self.events("sms"), timers),
                        Presence(self.config, self.events("presence"), timers)] if servers else []
        self.terms: dict[str, Terminal] = {}
        self._next = 21

    def ip(self, host: int) -> str:
        return f"{self.base}.{host}"

    def events(self, name: str) -> EventLog:
        return EventLog(name, str(self.tmp / f"{name}.jsonl"))

    def _ipsec(self, name: str) -> NodeIpsec | None:
        if self.mode != "ipsec-m2ms":
            return None
        self.backends[name] = MemoryBackend()
        return NodeIpsec(self.backends[name], "recording", name)

    async def start(self) -> None:
        await self.proxy.start()
        for server in self.servers:
            await server.start()

    async def terminal(self, name: str, register: bool = True, **kw: Any) -> Terminal:
        ip = self.ip(self._next)
        self._next += 1
        term = Terminal(name, self.config, ip, (self.ip(10), 5060), 5060, self.events(name),
                        self.timers, mode=self.mode, psk=self.creds.psk(name),
                        ipsec=self._ipsec(name), **kw)
        await term.start()
        self.terms[name] = term
        if register:
            assert (await term.register())["status"] == 200
        return term

    async def close(self) -> None:
        for term in self.terms.values():
            await term.close()
        for server in self.servers:
            await server.close()
        await self.proxy.close()


def run(scenario: Callable[[Net], Awaitable[None]], tmp: Path, mode: str = "open",
        servers: bool = False, timers: TimerConfig = T) -> None:
    async def main() -> None:
        net = Net(tmp, mode, servers, timers=timers)
        await net.start()
        try:
            await scenario(net)
        finally:
            await net.close()

    asyncio.run(main())


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class RawSip:
    """A bare UDP socket for hand-made SIP: send text, collect whatever comes back."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.sock.setblocking(False)
        self.addr: tuple[str, int] = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def send(self, text: str, to: tuple[str, int]) -> None:
        """`text` with {src}/{sport}, \\n line ends and a Content-Length filled in."""
        head, _, body = text.replace("\r\n", "\n").partition("\n\n")
        head = head.format(src=self.addr[0], sport=self.addr[1]).replace("\n", "\r\n")
        octets = body.replace("\n", "\r\n").encode()
        data = f"{head}\r\nContent-Length: {len(octets)}\r\n\r\n".encode() + octets
        self.sock.sendto(data, to)

    async def replies(self, wait: float = 0.5) -> list[str]:
        """First lines of everything received within `wait` seconds."""
        loop = asyncio.get_running_loop()
        out: list[str] = []
        deadline = loop.time() + wait
        while loop.time() < deadline:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            out.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
        return out


def sdp(ip: str, port: int = 40000, kind: str = "audio", key: str | None = None,
        c: str | None = None) -> str:
    text = (f"v=0\no=- 1 1 IN IP4 {ip}\ns=x\n{c or f'c=IN IP4 {ip}'}\nt=0 0\n"
            f"m={kind} {port} RTP/AVP {'0' if kind == 'audio' else '96'}\n")
    return text + (f"a=m2m-key:{key}\n" if key else "")


def request(method: str, ruri: str, frm: str, to: str, body: str = "",
            content_type: str | None = None, call_id: str | None = None) -> str:
    """A request for RawSip.send (Via and Contact are the socket's own)."""
    tag = random.getrandbits(32)
    lines = [f"{method} {ruri} SIP/2.0",
             f"Via: SIP/2.0/UDP {{src}}:{{sport}};branch=z9hG4bK{random.getrandbits(48):x};rport",
             "Max-Forwards: 70", f"From: <{frm}>;tag=t{tag}", f"To: <{to}>",
             f"Call-ID: {call_id or f'raw{tag}@test'}", f"CSeq: 1 {method}",
             f"Contact: <{frm.split('@')[0]}@{{src}}:{{sport}}>"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    return "\n".join(lines) + "\n\n" + body
