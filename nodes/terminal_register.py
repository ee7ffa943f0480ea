"""Fig 1 at the terminal: its SIP ports, the protected channel and REGISTER.

In ipsec-m2ms mode port 5060 is only where Fig 1 starts: it takes the answers to the
terminal's own unprotected REGISTER and drops every request unanswered (counted, logged);
requests come in over the protected channel, from the proxy's protected port, or not at all.
A registration through another interface gets a channel of its own (Fig 4 moves the active
one); a re-registration gets a fresh channel, and the old one's SAs go once the new one works.

A part of `nodes.terminal.Terminal` (mixed in): `Terminal.__init__` sets up the state used
here, declared below.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING, Any

from nodes import smig
from nodes.control import CommandError
from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import LabConfig
from nodes.secreg import ClientChannel, RegistrationError, SecRegClient
from nodes.sip.dialog import UserAgent
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.message import Request
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import TransactionTimeout
from nodes.sip.transport import Addr, UdpTransport
from nodes.sip.uri import SipUri

log = logging.getLogger("terminal")
DROP_LOG_INTERVAL = 1.0  # s: dropped requests, one log line per source at most this often


class TerminalRegistration:
    """The terminal's SIP ports and its registration with the proxy (Fig 1)."""

    # Set by Terminal.__init__.
    name: str
    aor: str
    config: LabConfig
    mode: str
    port: int
    proxy: Addr
    events: EventLog
    timers: TimerConfig
    counters: Counter[str]
    ipsec: NodeIpsec | None
    _psk: bytes | None
    interfaces: dict[str, str]
    active_ip: str
    ua: UserAgent | None
    plain: SipEndpoint | None
    secreg: SecRegClient | None
    channels: dict[str, ClientChannel]
    registered: bool
    _protected: dict[SipEndpoint, Addr]
    _drop_log: dict[str, tuple[float, int]]
    _secregs: dict[str, SecRegClient]
    _plains: dict[str, SipEndpoint]
    _reg_call_id: str
    _reg_cseq: int

    if TYPE_CHECKING:  # provided by Terminal
        def _ua(self) -> UserAgent: ...

    @property
    def channel(self) -> ClientChannel | None:
        """The protected channel in use (on the active interface)."""
        return self.channels.get(self.active_ip)

    # -- ports and channels -----------------------------------------------------------------
    def _secreg_for(self, ip: str) -> SecRegClient:
        if ip not in self._secregs:
            assert self.ipsec is not None and self._psk is not None
            self._secregs[ip] = SecRegClient(self.ipsec, self.aor, self._psk, ip,
                                             self.proxy[0], self.events, self._make_endpoint)
        return self._secregs[ip]

    async def _plain_for(self, ip: str) -> SipEndpoint:
        """Port 5060 on that address: where Fig 1 starts."""
        if ip not in self._plains:
            self._plains[ip] = self._plain_endpoint(await UdpTransport.create(ip, self.port))
        return self._plains[ip]

    def _plain_endpoint(self, transport: UdpTransport) -> SipEndpoint:
        """The unprotected port. In ipsec-m2ms mode it takes only the responses to our own
        REGISTER (Fig 1 step 1): every request there is dropped without an answer — the
        proxy reaches us over the protected channel, and nobody else may."""
        ep = SipEndpoint(transport, timers=self.timers, name=self.name)
        if self.ua is not None:
            ep.handler = self.ua._handle
            ep.ack_handler = self.ua._on_ack
        if self.mode == "ipsec-m2ms":
            ep.request_filter = lambda _source: False
            ep.on_filtered = partial(self._dropped, "unprotected")
        return ep

    def _make_endpoint(self, transport: UdpTransport) -> SipEndpoint:
        """An endpoint of the protected channel, served by the same UA core: requests only
        from the proxy's end of the channel's SAs (others are dropped unanswered)."""
        ep = SipEndpoint(transport, timers=self.timers, name=self.name)
        if self.ua is not None:
            ep.handler = self.ua._handle
            ep.ack_handler = self.ua._on_ack
        ep.request_filter = partial(self._from_proxy, ep)
        ep.on_filtered = partial(self._dropped, "not from the proxy")
        return ep

    def _from_proxy(self, ep: SipEndpoint, source: Addr) -> bool:
        return self._protected.get(ep) == source

    def _dropped(self, why: str, method: str | None, source: Addr) -> None:
        """Every dropped request is counted; a log line and an event at most once a second
        per source address (a flood must not become a log flood)."""
        self.counters["dropped-unprotected" if why == "unprotected"
                      else "dropped-not-proxy"] += 1
        now = time.monotonic()
        last, unlogged = self._drop_log.get(source[0], (-DROP_LOG_INTERVAL, 0))
        if now - last < DROP_LOG_INTERVAL:
            self._drop_log[source[0]] = (last, unlogged + 1)
            return
        if len(self._drop_log) >= 1024:  # bounded: sources come from the network
            self._drop_log.clear()
        self._drop_log[source[0]] = (now, 0)
        log.info("%s: dropped %s from %s:%d: %s%s", self.name,
                 method or "unparseable request", *source, why,
                 f" ({unlogged} more unlogged before)" if unlogged else "")
        self.events.emit("dropped", why=why, method=method, source=list(source),
                         unlogged_before=unlogged)

    def _protect(self, channel: ClientChannel) -> None:
        """The channel is up: its endpoints take requests from the proxy's protected ports
        (proxy port-c → our port-s, proxy port-s → our port-c: each pair has its SA)."""
        server = channel.agreed.server
        self._protected[channel.ep_s] = (server.ip, server.port_c)
        self._protected[channel.ep_c] = (server.ip, server.port_s)

    def _unprotect(self, channel: ClientChannel) -> None:
        self._protected.pop(channel.ep_s, None)
        self._protected.pop(channel.ep_c, None)

    async def _close_channel(self, ip: str, channel: ClientChannel) -> None:
        self._unprotect(channel)
        await self._secreg_for(ip).close_channel(channel)

    # -- REGISTER ---------------------------------------------------------------------------
    def _build_register(self, expires: int, contact: Addr, body: bytes | None = None
                        ) -> Request:
        self._reg_cseq += 1
        user = self.aor.removeprefix("sip:").split("@")[0]
        req = Request("REGISTER", f"sip:{self.config.domain}", [
            ("From", f"<{self.aor}>;tag={new_tag()}"), ("To", f"<{self.aor}>"),
            ("Call-ID", self._reg_call_id), ("CSeq", f"{self._reg_cseq} REGISTER"),
            ("Contact", f"<sip:{user}@{contact[0]}:{contact[1]}>"), ("Expires", str(expires)),
        ])
        if body is not None:  # Fig 4: the sessions to move ride on the registration
            req.set_body(body, smig.CONTENT_TYPE)
        return req

    async def register(self, expires: int = 3600, via: str | None = None,
                       body: str | None = None) -> dict[str, Any]:
        """REGISTER (Fig 1 in ipsec-m2ms mode), through interface `via` if given; `body` is
        sent as application/smig+json (a link-switch request, or anything a lab wants to
        show the proxy refusing)."""
        if not 0 <= expires <= 86400:
            raise CommandError(f"expires must be 0..86400, got {expires}")
        ua = self._ua()
        ip = None
        if via is not None:
            ip = self.interfaces.get(via) or (via if via in self.interfaces.values() else None)
            if ip is None:
                raise CommandError(f"no interface {via!r} (have: {', '.join(self.interfaces)})")
        if self.secreg is not None:
            return await self._register_secure(expires, ip, body.encode() if body else None)
        if ip is not None or body is not None:
            raise CommandError("via and body need the ipsec-m2ms mode")
        req = self._build_register(expires, ua.endpoint.advertised)
        self.events.emit("register-sent", expires=expires)
        try:
            resp = await ua.endpoint.request(req, self.proxy)
        except TransactionTimeout as exc:
            self.events.emit("register-failed", error=str(exc))
            raise CommandError(f"registration failed: no answer from the proxy ({exc})") from None
        self.registered = resp.status == 200 and expires > 0
        self.events.emit("register-done", status=resp.status, expires=expires)
        return {"status": resp.status, "reason": resp.reason}

    async def register_via(self, ip: str, body: bytes | None = None) -> dict[str, Any]:
        """Register through another interface and make it the active one (Fig 4)."""
        return await self._register_secure(3600, ip, body)

    async def _register_secure(self, expires: int, ip: str | None = None,
                               body: bytes | None = None) -> dict[str, Any]:
        """Fig 1 (sec-agree with the PSK) through the interface with address `ip`; a
        re-registration gets a fresh channel and the old one's SAs go only once the new one
        has carried the 200."""
        assert self.ua is not None and self.plain is not None
        ip = ip or self.active_ip
        secreg = self._secreg_for(ip)
        old = self.channels.get(ip)
        if expires == 0:
            if old is None:
                raise CommandError("not registered")
            del self.channels[ip]
            self.registered = bool(self.channels)
            self._unprotect(old)
            resp = await secreg.unregister(old, partial(self._build_register, 0))
            if self.channel is None:
                self.ua.endpoint = self.plain
            status = resp.status if resp is not None else None
            self.events.emit("register-done", status=status, expires=0)
            return {"status": status, "reason": resp.reason if resp else "no answer"}
        in_use = {sa.spi for c in self.channels.values() for sa in c.saset.sas}
        try:
            channel, resp = await secreg.register(
                await self._plain_for(ip), partial(self._build_register, expires, body=body),
                expires, in_use)
        except RegistrationError as exc:
            self.events.emit("register-failed", error=str(exc), address=ip)
            raise CommandError(str(exc)) from None
        self.channels[ip] = channel
        self._protect(channel)
        self.active_ip = ip
        self.ua.endpoint = channel.ep_c
        user = self.aor.removeprefix("sip:").split("@")[0]
        self.ua.contact = SipUri(ip, user, port=channel.ep_s.local_addr[1])
        if old is not None:
            await self._close_channel(ip, old)
        self.registered = True
        self.events.emit("register-done", status=resp.status, expires=expires, address=ip,
                         port_c=channel.ep_c.local_addr[1], port_s=channel.ep_s.local_addr[1])
        return {"status": resp.status, "reason": resp.reason,
                "spis": sorted(sa.spi for sa in channel.saset.sas)}

    def _proxy_hop(self) -> Addr:
        if self.secreg is None:
            return self.proxy
        if self.channel is None:
            raise CommandError("not registered: the proxy only talks over the protected channel")
        return self.channel.proxy_hop

    async def unregister(self) -> dict[str, Any]:
        return await self.register(expires=0)
