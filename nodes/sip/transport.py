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
MAX_DATAGRAM = 65535
# Receive buffer asked for (the kernel doubles it and caps it at net.core.rmem_max): the
# 208 KiB default holds under a hundred SIP datagrams, and a burst longer than that (a
# proxy under load, a garbage-collection pause) is dropped and costs a retransmission.
RCVBUF = 1024 * 1024


class UdpTransport(asyncio.DatagramProtocol):
    """SIP over UDP on one local address."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._receiver: Receiver | None = None
        self.local_addr: Addr = ("0.0.0.0", 0)
        self.reliable = False

    @classmethod
    async def create(cls, host: str = "127.0.0.1", port: int = 0) -> UdpTransport:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(cls, local_addr=(host, port))
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                          RCVBUF)
        sock = transport.get_extra_info("sockname")
        self.local_addr = (sock[0], sock[1])

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self._receiver is not None:
            self._receiver(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) surface here; transactions time out instead.
        log.debug("UDP error on %s: %s", self.local_addr, exc)

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def send(self, data: bytes, addr: Addr) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("transport closed")
        if len(data) > MAX_DATAGRAM:
            raise ValueError(f"datagram of {len(data)} octets is too large for UDP")
        self._transport.sendto(data, addr)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


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
