"""Datagram transports for the SIP stack: a real asyncio UDP endpoint and an in-process
network with programmable loss, for tests of retransmission and timeouts.

A transport moves octets only; ``SipEndpoint`` does the parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
Addr = tuple[str, int]
Receiver = Callable[[bytes, Addr], None]
# Looks at a datagram before anything parses it: False drops it (a proxy's first line of
# defence against sources it does not know; see UdpTransport.gate).
Gate = Callable[[bytes, Addr], bool]
MAX_DATAGRAM = 65535
# Receive buffer asked for (the kernel doubles it and caps it at net.core.rmem_max): the
# 208 KiB default holds under a hundred SIP datagrams, and a burst longer than that (a
# proxy under load, a garbage-collection pause) is dropped and costs a retransmission.
RCVBUF = 1024 * 1024


class UdpTransport:
    """SIP over UDP on one local address.

    The socket is read straight from the event loop's selector, up to `BATCH` datagrams a
    wake-up: asyncio's datagram transport reads one per wake-up, so a server under load
    paid a selector round and a loop turn for every message. Sends go straight to the
    socket too. A send the kernel refuses (full buffer, no route while a link is down) is
    a lost datagram, as with asyncio's transport: logged, counted, and left to SIP's
    retransmissions and timers.
    """

    BATCH = 64

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock: socket.socket | None = sock
        self._loop = loop
        self._receiver: Receiver | None = None
        name = sock.getsockname()
        self.local_addr: Addr = (name[0], name[1])
        self.reliable = False
        self.send_errors = 0
        # Consulted for every datagram before the receiver: a node that must not answer
        # strangers (the proxy) drops their datagrams here, before the SIP layer could
        # parse them and answer a malformed one itself.
        self.gate: Gate | None = None

    @classmethod
    async def create(cls, host: str = "127.0.0.1", port: int = 0) -> UdpTransport:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        transport = cls(sock, loop)
        loop.add_reader(sock.fileno(), transport._readable)
        return transport

    def _readable(self) -> None:
        sock = self._sock
        for _ in range(self.BATCH):
            if sock is None or self._sock is None:  # closed by a receiver
                return
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error reported on the socket
                log.debug("UDP error on %s: %s", self.local_addr, exc)
                continue
            source = (addr[0], addr[1])
            gate = self.gate
            if self._receiver is not None and (gate is None or gate(data, source)):
                self._receiver(data, source)

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def send(self, data: bytes, addr: Addr) -> None:
        if self._sock is None:
            raise ConnectionError("transport closed")
        if len(data) > MAX_DATAGRAM:
            raise ValueError(f"datagram of {len(data)} octets is too large for UDP")
        try:
            self._sock.sendto(data, addr)
        except OSError as exc:
            self.send_errors += 1
            log.debug("UDP send from %s to %s:%d failed: %s", self.local_addr, *addr, exc)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()


@dataclass
class Packet:
    src: Addr
    dst: Addr
    data: bytes
    index: int
    dropped: bool = False


DropRule = Callable[[Packet], bool]


def drop_first(n: int, *, src: Addr | None = None, dst: Addr | None = None) -> DropRule:
    """Drops the first n packets that match src/dst."""
    seen = [0]

    def rule(p: Packet) -> bool:
        if (src and p.src != src) or (dst and p.dst != dst):
            return False
        seen[0] += 1
        return seen[0] <= n

    return rule


def drop_every_other(*, src: Addr | None = None, dst: Addr | None = None) -> DropRule:
    """Drops the 1st, 3rd, 5th ... matching packet."""
    seen = [0]

    def rule(p: Packet) -> bool:
        if (src and p.src != src) or (dst and p.dst != dst):
            return False
        seen[0] += 1
        return seen[0] % 2 == 1

    return rule


def drop_all(*, src: Addr | None = None, dst: Addr | None = None) -> DropRule:
    return lambda p: (not src or p.src == src) and (not dst or p.dst == dst)


@dataclass
class MemoryNetwork:
    """Delivers datagrams between MemoryTransports on the running loop.

    rules: every packet whose rule returns True is dropped; log records all packets.
    """

    latency: float = 0.0
    rules: list[DropRule] = field(default_factory=list)
    log: list[Packet] = field(default_factory=list)
    _nodes: dict[Addr, MemoryTransport] = field(default_factory=dict)

    def transport(self, addr: Addr) -> MemoryTransport:
        t = MemoryTransport(self, addr)
        self._nodes[addr] = t
        return t

    def deliver(self, src: Addr, dst: Addr, data: bytes) -> None:
        p = Packet(src, dst, data, len(self.log))
        self.log.append(p)
        if any(rule(p) for rule in self.rules):
            p.dropped = True
            return
        node = self._nodes.get(dst)
        if node is None:
            return
        loop = asyncio.get_running_loop()
        if self.latency:
            loop.call_later(self.latency, node.receive, data, src)
        else:
            loop.call_soon(node.receive, data, src)

    def sent(self, src: Addr | None = None, start: bytes | None = None) -> list[Packet]:
        """Packets (delivered or not) from src whose data begins with 'start'."""
        return [p for p in self.log if (src is None or p.src == src)
                and (start is None or p.data.startswith(start))]


class MemoryTransport:
    reliable = False

    def __init__(self, net: MemoryNetwork, addr: Addr) -> None:
        self.net = net
        self.local_addr = addr
        self._receiver: Receiver | None = None
        self.closed = False

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def receive(self, data: bytes, src: Addr) -> None:
        if self._receiver is not None and not self.closed:
            self._receiver(data, src)

    def send(self, data: bytes, addr: Addr) -> None:
        if self.closed:
            raise ConnectionError("transport closed")
        self.net.deliver(self.local_addr, addr, data)

    def close(self) -> None:
        self.closed = True
        self.net._nodes.pop(self.local_addr, None)
