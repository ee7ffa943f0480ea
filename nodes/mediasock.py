"""UDP sockets and addresses of the RTP streams (`nodes.media`'s senders and receiver).

The receiver's sockets ask for two kinds of ancillary data with every datagram: IP_PKTINFO
(on which interface it came in, and to which local address) and SO_TIMESTAMPNS (when the
kernel took it); the readers of both are here, beside the options that produce them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")

Address = tuple[str, int]


def check_address(remote: Address) -> Address:
    """(IPv4, port) or ValueError; shared by constructors and retarget."""
    try:
        ip, port = remote
        ipaddress.IPv4Address(ip)
    except (TypeError, ValueError):
        raise ValueError(f"expected (IPv4 address, port), got {remote!r}") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port!r}")
    return ip, port


def check_ip(ip: str) -> str:
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        raise ValueError(f"local address must be IPv4, got {ip!r}") from None
    return ip


def udp_socket(local: Address, what: str, pktinfo: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if pktinfo:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            # Kernel receive timestamps: arrival times that do not depend on when the event
            # loop gets round to reading (DESIGN §2: the receiver logs arrival times).
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind(local)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot bind {what} to {local[0]}:{local[1]}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def addr_text(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}"


def kernel_time(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The SO_TIMESTAMPNS arrival time (wall clock, ns) of a received datagram, if any."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec
    return None


def read_pktinfo(anc: list[tuple[int, int, bytes]]) -> tuple[str, str]:
    """(interface name, local destination address) from IP_PKTINFO."""
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            index = struct.unpack_from("I", data)[0]
            dst = socket.inet_ntoa(data[8:12])  # ipi_addr: the header's destination
            try:
                return socket.if_indextoname(index), dst
            except OSError:
                return str(index), dst
    return "?", "?"
