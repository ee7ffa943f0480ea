"""UDP probe stream: a path monitor between two lab hosts.

The sender sends one stream per path (a path = a local source address, hence an interface
under the lab's source routing) at a fixed rate; the echo side logs every arrival and sends it
back; the sender logs the echoes with the interface they came in on. Logs are JSON lines with
wall-clock `t_ns` (DESIGN §2, Measurements)::

    python -m nodes.probe echo --port 9000 --log b1.jsonl
    python -m nodes.probe send --to 10.0.3.10:9000 --path wlan=10.0.1.10 --path lte=10.0.2.10 \\
        --rate 50 --log a1.jsonl [--seconds 10]

Runs until --seconds pass or SIGTERM/SIGINT; every log line is flushed as it is written.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

from nodes.events import EventLog

MAGIC = b"SMPR"
_HEADER = struct.Struct("!4sB16sIQ")  # magic, version, path (NUL-padded), seq, sent t_ns
VERSION = 1
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


@dataclass(frozen=True)
class ProbePacket:
    path: str
    seq: int
    sent_ns: int
    echo: bool = False

    def serialize(self) -> bytes:
        path = self.path.encode()
        if len(path) > 16:
            raise ValueError(f"path name {self.path!r} longer than 16 bytes")
        flags = VERSION | (0x80 if self.echo else 0)
        return _HEADER.pack(MAGIC, flags, path, self.seq, self.sent_ns)

    @classmethod
    def parse(cls, data: bytes) -> ProbePacket:
        if len(data) < _HEADER.size:
            raise ValueError(f"probe packet too short: {len(data)} bytes < {_HEADER.size}")
        magic, flags, path, seq, sent = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"not a probe packet: magic {magic!r}")
        if flags & 0x7F != VERSION:
            raise ValueError(f"probe version {flags & 0x7F} not supported")
        try:
            name = path.rstrip(b"\0").decode()
        except UnicodeDecodeError as exc:
            raise ValueError(f"probe path name is not UTF-8: {exc}") from None
        return cls(name, seq, sent, bool(flags & 0x80))


def _ifname(ancdata: list[tuple[int, int, bytes]]) -> str:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 4:
            index = struct.unpack_from("I", data)[0]
            try:
                return socket.if_indextoname(index)
            except OSError:
                return str(index)
    return "?"


def _recv_socket(bind: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind(bind)
    sock.setblocking(False)
    return sock


async def _receive(sock: socket.socket, log: EventLog, echo: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(sock.fileno(), ready.set)
    try:
        while True:
            await ready.wait()
            ready.clear()
            while True:
                try:
                    data, anc, _, addr = sock.recvmsg(2048, 256)
                except BlockingIOError:
                    break
                try:
                    pkt = ProbePacket.parse(data)
                except ValueError as exc:
                    log.emit("bad-packet", src=addr[0], error=str(exc))
                    continue
                log.emit(
                    "echo-rx" if pkt.echo else "rx",
                    path=pkt.path, seq=pkt.seq, sent_ns=pkt.sent_ns,
                    src=addr[0], iface=_ifname(anc),
                )
                if echo and not pkt.echo:
                    reply = ProbePacket(pkt.path, pkt.seq, pkt.sent_ns, echo=True)
                    try:
                        sock.sendto(reply.serialize(), addr)
                    except OSError as exc:  # path down: the sender notices by the silence
                        log.emit("tx-error", path=pkt.path, error=str(exc))
    finally:
        loop.remove_reader(sock.fileno())


async def _send(
    sock: socket.socket, path: str, dest: tuple[str, int], rate: float, log: EventLog
) -> None:
    interval = 1.0 / rate
    start = time.monotonic()
    seq = 0
    while True:
        seq += 1
        sent = time.time_ns()
        try:
            sock.sendto(ProbePacket(path, seq, sent).serialize(), dest)
            log.emit("tx", path=path, seq=seq)
        except OSError as exc:  # e.g. no route while the link is down: keep counting
            log.emit("tx-error", path=path, seq=seq, error=str(exc))
        await asyncio.sleep(max(0.0, start + seq * interval - time.monotonic()))


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _path(text: str) -> tuple[str, str]:
    name, sep, addr = text.partition("=")
    try:
        socket.inet_aton(addr)
    except OSError:
        raise argparse.ArgumentTypeError(f"expected NAME=IPV4, got {text!r}") from None
    if not sep or not name or len(name.encode()) > 16:
        raise argparse.ArgumentTypeError(f"expected NAME=IPV4 (name ≤ 16 bytes), got {text!r}")
    return name, addr


async def _main(args: argparse.Namespace, log: EventLog) -> None:
    tasks: list[asyncio.Future[Any]] = []
    if args.mode == "echo":
        tasks.append(asyncio.ensure_future(_receive(_recv_socket(("0.0.0.0", args.port)), log,
                                                    echo=True)))
        log.emit("listening", port=args.port)
    else:
        for name, addr in args.path:
            sock = _recv_socket((addr, 0))
            tasks.append(asyncio.ensure_future(_receive(sock, log, echo=False)))
            tasks.append(asyncio.ensure_future(_send(sock, name, args.to, args.rate, log)))
            log.emit("path", path=name, src=addr, dst=f"{args.to[0]}:{args.to[1]}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.seconds:
            await asyncio.wait_for(stop.wait(), args.seconds)
        else:
            await stop.wait()
    except TimeoutError:
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.emit("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodes.probe", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    echo = sub.add_parser("echo", help="log and echo probe packets")
    echo.add_argument("--port", type=int, default=9000)
    send = sub.add_parser("send", help="send one probe stream per path")
    send.add_argument("--to", type=_hostport, required=True, help="HOST:PORT of the echo side")
    send.add_argument("--path", type=_path, action="append", required=True,
                      help="NAME=SRC_IPV4, repeatable: one stream per local address")
    send.add_argument("--rate", type=float, default=50.0, help="packets/s per path")
    for p in (echo, send):
        p.add_argument("--log", help="JSON-lines log file (default: stdout)")
        p.add_argument("--seconds", type=float, default=0, help="stop after this long")
        p.add_argument("--node", default=socket.gethostname(), help="node name in the log")
    args = parser.parse_args(argv)
    if args.mode == "send" and not 0 < args.rate <= 10000:
        parser.error(f"--rate must be in (0, 10000], got {args.rate}")
    log = EventLog(args.node, args.log)
    try:
        asyncio.run(_main(args, log))
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
