"""Hand-made SIP datagrams for the proxy tests: a plain UDP socket on a loopback address
that sends octets as written (forged headers included) and collects what comes back."""

from __future__ import annotations

import asyncio
import secrets
import socket

from nodes.sip.transport import Addr


def branch() -> str:
    return "z9hG4bK" + secrets.token_hex(6)


class RawSip:
    def __init__(self, ip: str, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.sock.setblocking(False)
        self.addr: Addr = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, dst: Addr) -> None:
        self.sock.sendto(data, dst)

    async def replies(self, wait: float = 0.3) -> list[bytes]:
        """Everything that arrived within `wait` seconds (the proxy runs meanwhile)."""
        await asyncio.sleep(wait)
        got = []
        while True:
            try:
                got.append(self.sock.recv(65535))
            except BlockingIOError:
                return got

    async def statuses(self, wait: float = 0.3) -> list[str]:
        return [d.split(b"\r\n", 1)[0].decode(errors="replace") for d in
                await self.replies(wait)]

    def request(self, method: str, ruri: str, *, frm: str, to: str, extra: str = "",
                via: str | None = None, call_id: str | None = None, cseq: str | None = None,
                from_tag: str | None = None, body: bytes = b"") -> bytes:
        """A request from this socket (its Via names it, with rport) as octets."""
        host, port = self.addr
        via = via if via is not None else \
            f"Via: SIP/2.0/UDP {host}:{port};branch={branch()};rport\r\n"
        call_id = call_id or f"{secrets.token_hex(5)}@raw"
        cseq = cseq if cseq is not None else f"1 {method}"
        head = (f"{method} {ruri} SIP/2.0\r\n{via}Max-Forwards: 70\r\n"
                f"From: <{frm}>;tag={from_tag or secrets.token_hex(4)}\r\nTo: {to}\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {cseq}\r\n{extra}"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    def register(self, user: str, domain: str = "m2m.example", extra: str = "") -> bytes:
        host, port = self.addr
        aor = f"sip:{user}@{domain}"
        return self.request("REGISTER", f"sip:{domain}", frm=aor, to=f"<{aor}>",
                            extra=f"Contact: <sip:{user}@{host}:{port}>\r\nExpires: 300\r\n"
                            + extra)
