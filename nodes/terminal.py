"""Terminal node: a SIP UA that registers, calls, answers, sends MESSAGE and hangs up.

Driven by the runner through its control socket (`nodes.control`); every step is a JSON line
in its event log with a wall-clock `t_ns` (DESIGN §2, Measurements).

    python -m nodes.terminal --name a1 --local 10.0.1.10 --proxy 10.0.0.10 --mode open \\
        --events run/events/a1.jsonl --control run/ctl/a1.sock

In ipsec-m2ms mode port 5060 is only where Fig 1 starts: it takes the answers to the
terminal's own unprotected REGISTER and drops every request unanswered (counted, logged);
requests come in over the protected channel, from the proxy's protected port, or not at all.
An offer the terminal cannot take gets 488 with the reason in a Warning header before
anything is set up; a 2xx that is never acknowledged ends the call with a BYE (RFC 3261
§13.3.1.4); on shutdown BYEs go out in parallel, bounded, and the SAs always go.

Control commands (JSON replies; `help` lists them with their parameters):

    register  [expires]        REGISTER with the proxy; replies with the status
    unregister                 REGISTER with Expires: 0
    call      to               INVITE through the proxy; replies when it is answered or fails
    hangup    call_id          BYE
    message   to, text         MESSAGE through the proxy
    status                     registration, dialogs, counters
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from nodes import smig
from nodes.cli import (
    existing_dir,
    interface_address,
    ipv4,
    local_ipv4,
    node_arguments,
    port_number,
    run_node,
    start_logging,
    starting,
)
from nodes.control import CommandError, ControlServer, until_stopped
from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import ConfigError, Credentials, LabConfig
from nodes.linkswitch import LinkSwitcher, check_media_timeout
from nodes.mediakeys import Role
from nodes.mediasession import FORMATS, MediaError, MediaSession
from nodes.secreg import ClientChannel, RegistrationError, SecRegClient
from nodes.sip.dialog import Dialog, UserAgent
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.grammar import quote
from nodes.sip.message import Request, Response
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ServerTransaction, TransactionTimeout
from nodes.sip.transport import Addr, UdpTransport
from nodes.sip.uri import SipUri, parse_uri
from nodes.smigagent import SmigAgent

log = logging.getLogger("terminal")
# On shutdown, how long the BYEs of all calls may take together: a dead peer must not hold
# up the exit (the lab gives a node 3 s after SIGTERM before it kills it).
CLOSE_BYE_WAIT = 1.0
DROP_LOG_INTERVAL = 1.0  # s: dropped requests, one log line per source at most this often
MAX_MESSAGE_TEXT = 1300  # bytes; RFC 3428 §6: MESSAGE over UDP without congestion control


def warning(agent: str, text: str) -> str:
    """A Warning header value (RFC 3261 §20.43, code 399) that says why, on one short
    printable line."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)[:160]
    return f"399 {agent} {quote(clean)}"


class Terminal:
    def __init__(
        self,
        name: str,
        config: LabConfig,
        local_ip: str,
        proxy: Addr,
        port: int = 5060,
        events: EventLog | None = None,
        timers: TimerConfig | None = None,
        media_dir: Path | None = None,
        media_loop: bool = True,
        mode: str = "open",
        psk: bytes | None = None,
        ipsec: NodeIpsec | None = None,
        interfaces: dict[str, str] | None = None,
    ) -> None:
        if config.terminal_of(name) is None:
            raise ValueError(f"terminal {name!r} is not in {config.source}")
        if mode == "ipsec-m2ms" and (psk is None or ipsec is None):
            raise ValueError("ipsec-m2ms mode needs a PSK and an IPsec backend")
        self.mode, self.ipsec, self._psk = mode, ipsec, psk
        # interface name -> address; the SIP channel and media use `active_ip` (Fig 4 moves it)
        self.interfaces = dict(interfaces or {})
        if local_ip not in self.interfaces.values():
            self.interfaces[f"{name}-primary"] = local_ip
        self.active_ip = local_ip
        self.channels: dict[str, ClientChannel] = {}  # local address -> protected channel
        # Protected endpoint -> the proxy address its requests must come from (Fig 1 SAs).
        self._protected: dict[SipEndpoint, Addr] = {}
        self._drop_log: dict[str, tuple[float, int]] = {}  # source -> (last logged, since)
        self._secregs: dict[str, SecRegClient] = {}
        self._plains: dict[str, SipEndpoint] = {}
        self.name, self.config = name, config
        self.aor = config.aor(name)
        self.local_ip, self.port, self.proxy = local_ip, port, proxy
        self.media_dir = media_dir  # received WAVs and per-packet media logs go here
        self.media_loop = media_loop
        self.media: dict[str, MediaSession] = {}  # call-id -> its secure data channel
        self._media_log: EventLog | None = None
        self._wavs = 0
        self.events = events or EventLog(name)
        self.smig = SmigAgent(self)
        self.timers = timers or TimerConfig()
        self.secreg = self._secreg_for(local_ip) if ipsec is not None else None
        self.linkswitch = LinkSwitcher(self)
        self.counters: Counter[str] = Counter()
        self.ua: UserAgent | None = None
        self.plain: SipEndpoint | None = None  # port 5060: where Fig 1 starts
        self.calls: dict[str, Dialog] = {}
        self.registered = False
        self._reg_call_id = f"reg-{new_tag()}@{local_ip}"
        self._reg_cseq = 0
        self.messages: list[dict[str, Any]] = []

    @property
    def channel(self) -> ClientChannel | None:
        """The protected channel in use (on the active interface)."""
        return self.channels.get(self.active_ip)

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

    async def start(self) -> None:
        transport = await UdpTransport.create(self.local_ip, self.port)
        endpoint = self._plain_endpoint(transport)
        self.ua = UserAgent(endpoint, self.aor, on_request=self._on_request)
        self.ua.on_ack = self._on_ack
        self.ua.on_ack_timeout = self._on_ack_timeout
        self.plain = endpoint
        self._plains[self.local_ip] = endpoint
        self.events.emit("terminal-started", aor=self.aor, local=f"{self.local_ip}:{self.port}",
                         proxy=f"{self.proxy[0]}:{self.proxy[1]}")

    async def close(self) -> None:
        """BYE for every call (in parallel, at most CLOSE_BYE_WAIT in all), media and SAs
        removed, sockets closed. The channels' SAs go whatever happens before."""
        if self.ua is None:
            return
        try:
            await self._bye_all(CLOSE_BYE_WAIT)
            for session in list(self.media.values()):  # switched-in sessions have no dialog
                await session.close("terminal stopped")
            self.media.clear()
            await self.linkswitch.disarm()
        finally:
            for ip, channel in list(self.channels.items()):
                await self._close_channel(ip, channel)
            self.channels.clear()
            for plain in self._plains.values():
                await plain.close()
            self.ua = None

    async def _bye_all(self, wait: float) -> None:
        tasks = [asyncio.ensure_future(self._bye(dlg)) for dlg in list(self.calls.values())]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=wait)
        for task in pending:  # a dead peer: its BYE is given up (its media is gone already)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- commands ---------------------------------------------------------------------------
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

    def media_log(self) -> EventLog:
        """Per-packet media events go to their own file, away from the signalling steps."""
        if self._media_log is None:
            self._media_log = (EventLog(self.name, str(self.media_dir /
                                                       f"{self.name}-media.jsonl"))
                               if self.media_dir else self.events)
        return self._media_log

    def media_wav(self) -> Path | None:
        self._wavs += 1
        return self.media_dir / f"{self.name}-call{self._wavs}.wav" if self.media_dir else None

    def _media_session(self, role: Role, kind: str) -> MediaSession:
        return MediaSession(role, self.local_ip, kind, self.media_log(), self.ipsec,
                            self.media_wav(), self.media_loop, self._spis_in_use())

    def _spis_in_use(self) -> set[int]:
        spis = {sa.spi for c in self.channels.values() for sa in c.saset.sas}
        for m in self.media.values():
            spis |= m.spis()
        return spis

    def _capable(self, kind: str) -> None:
        capabilities = self.config.terminals[self.name].capabilities
        if kind not in capabilities:
            raise MediaError(f"{self.name} does not do {kind} (only "
                             f"{', '.join(capabilities)})")

    async def call(self, to: str, media: str = "audio") -> dict[str, Any]:
        ua = self._ua()
        target = self._target(to)
        if media not in FORMATS:
            raise CommandError(f"unknown media {media!r} (audio or video)")
        hop = self._proxy_hop()
        try:
            self._capable(media)
            session = self._media_session(Role.OFFERER, media)
        except ValueError as exc:  # MediaError, or no free RTP port
            raise CommandError(str(exc)) from None
        tx = ua.start_invite(target, hop, body=session.sdp())
        call_id = tx.request.call_id or ""
        self.events.emit("call-started", call_id=call_id, to=target, media=media)
        try:
            resp, dlg = await ua.complete_invite(tx)
        except TransactionTimeout:
            await session.close("no answer")
            self.events.emit("call-failed", call_id=call_id, error="timeout")
            raise CommandError("call failed: no answer (Timer B)") from None
        except ValueError as exc:  # a 2xx no dialog can be made from (Contact, tags)
            await session.close("bad answer")
            self.events.emit("call-failed", call_id=call_id, error=f"unusable 2xx: {exc}")
            raise CommandError(f"call failed: unusable 2xx ({exc})") from None
        if dlg is None:
            await session.close(f"{resp.status}")
            self.events.emit("call-failed", call_id=call_id, status=resp.status)
            result = {"call_id": call_id, "status": resp.status, "reason": resp.reason}
            return {**result, **_warning_of(resp)}
        self.calls[dlg.call_id] = dlg
        try:  # the answer is checked in full before any SA goes in; the 2xx is ACKed
            session.accept_remote(resp.body)
            session.establish(call_id)
        except MediaError as exc:
            await session.close("bad answer")
            self.events.emit("call-failed", call_id=call_id, error=f"unusable answer: {exc}")
            status = await self._bye(dlg)
            raise CommandError(f"call failed: unusable answer ({exc}); the call is ended "
                               f"(BYE: {status or 'no answer'})") from None
        self.media[call_id] = session  # Fig 2: the caller's dialog is confirmed by the 2xx
        session.start_sending()
        self.events.emit("call-confirmed", call_id=call_id, peer=str(dlg.remote_uri.uri),
                         role="caller", media=media)
        return {"call_id": call_id, "status": resp.status, "reason": resp.reason}

    async def hangup(self, call_id: str) -> dict[str, Any]:
        dlg = self.calls.get(call_id)
        if dlg is None:
            raise CommandError(f"no call {call_id!r} (calls: {', '.join(self.calls) or 'none'})")
        status = await self._bye(dlg)
        return {"call_id": call_id, "status": status}

    async def _end_media(self, call_id: str, why: str) -> None:
        session = self.media.pop(call_id, None)
        if session is not None:
            await session.close(why)

    async def _bye(self, dlg: Dialog) -> int | None:
        """Media (and its SAs) first, then the BYE; None: no answer."""
        assert self.ua is not None
        ua = self.ua
        self.calls.pop(dlg.call_id, None)
        await self._end_media(dlg.call_id, "BYE")
        status: int | None = None
        try:
            status = (await ua.request(dlg, "BYE")).status
        except (TransactionTimeout, ValueError):  # no answer, or the dialog ended meanwhile
            pass
        finally:  # also when a shutdown gives up on it
            self.events.emit("call-ended", call_id=dlg.call_id, by="local", status=status)
        return status

    async def _on_ack_timeout(self, dlg: Dialog) -> None:
        """RFC 3261 §13.3.1.4: our 2xx was never acknowledged: end the session with a BYE
        (its media, and media SAs, go first)."""
        if self.calls.get(dlg.call_id) is not dlg:
            return
        self.counters["ack-timeout"] += 1
        self.events.emit("call-failed", call_id=dlg.call_id, error="2xx never acknowledged")
        await self._bye(dlg)

    async def message(self, to: str, text: str) -> dict[str, Any]:
        ua = self._ua()
        target = self._target(to)
        if len(text.encode(errors="surrogateescape")) > MAX_MESSAGE_TEXT:
            raise CommandError(f"text too long for a MESSAGE over UDP (at most "
                               f"{MAX_MESSAGE_TEXT} bytes)")
        try:
            resp = await ua.message(target, self._proxy_hop(), text.encode())
        except TransactionTimeout:
            self.events.emit("message-failed", to=target, error="timeout")
            raise CommandError("message failed: no answer (Timer F)") from None
        self.events.emit("message-sent", to=target, status=resp.status)
        return {"status": resp.status, "reason": resp.reason}

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name, "aor": self.aor, "registered": self.registered,
            "mode": self.mode,
            "ipsec": self.ipsec.describe() if self.ipsec else None,
            "calls": {cid: {"state": d.state.value, "peer": str(d.remote_uri.uri),
                            "media": self.media[cid].status() if cid in self.media else None}
                      for cid, d in self.calls.items()},
            "sessions": {sid: m.status() for sid, m in self.media.items()
                         if sid not in self.calls},
            "messages": self.messages[-20:],
            "counters": dict(self.counters),
        }

    # -- incoming ---------------------------------------------------------------------------
    async def _on_request(self, tx: ServerTransaction, dlg: Dialog | None) -> None:
        req = tx.request
        self.counters[f"rx-{req.method}"] += 1
        if dlg is None and req.method == "INVITE":
            await self._answer(tx)
        elif req.method == "MESSAGE" and req.content_type is not None and \
                req.content_type.mime == smig.CONTENT_TYPE:
            await self.smig.on_message(tx)
        elif req.method == "MESSAGE":
            record = {"from": str(req.from_.uri) if req.from_ else None,
                      "text": req.body.decode(errors="replace"), "call_id": req.call_id}
            self.messages.append(record)
            self.events.emit("message-received", **record)
            tx.reply(200)
        elif req.method == "INVITE" and dlg is not None:  # re-INVITE (baseline B2)
            self.linkswitch.on_reinvite(tx, dlg.call_id)
        elif req.method == "BYE" and dlg is not None:
            self.calls.pop(dlg.call_id, None)
            await self._end_media(dlg.call_id, "BYE")
            self.events.emit("call-ended", call_id=dlg.call_id, by="remote")
        elif dlg is None:
            tx.reply(405 if req.method not in ("OPTIONS",) else 200)

    async def _answer(self, tx: ServerTransaction) -> None:
        """An incoming call: answer with our m2m-key; SAs and receiver before the 200 goes
        out (the caller starts sending when it sees it), our sender once the ACK comes. An
        offer that cannot be used gets 488 first, with nothing set up and nothing left."""
        req = tx.request
        ua = self._ua()
        call_id = req.call_id or ""
        self.events.emit("incoming-call", call_id=call_id,
                         peer=str(req.from_.uri) if req.from_ else None)
        if call_id in self.media or call_id in self.calls:
            self.events.emit("call-refused", call_id=call_id, status=400,
                             why="Call-ID already in use")
            tx.reply(400, "Call-ID already in use")
            return
        try:
            kind = MediaSession.offered_kind(req.body)
            self._capable(kind)
        except MediaError as exc:
            self.refuse_sdp(tx, call_id, exc)
            return
        try:
            session = self._media_session(Role.ANSWERER, kind)
        except ValueError as exc:  # no free RTP port: ours, not the caller's fault
            log.warning("%s: cannot answer %s: %s", self.name, call_id, exc)
            tx.reply(503, "No media port free")
            return
        try:
            session.accept_remote(req.body)
            session.establish(call_id)
        except MediaError as exc:
            await session.close("refused")
            self.refuse_sdp(tx, call_id, exc)
            return
        self.media[call_id] = session
        new = ua.answer(tx, 200, body=session.sdp(), content_type="application/sdp")
        if new is not None:
            self.calls[new.call_id] = new
            self.events.emit("call-confirmed", call_id=new.call_id,
                             peer=str(new.remote_uri.uri), role="callee", media=session.kind)

    def refuse_sdp(self, tx: ServerTransaction, call_id: str, exc: MediaError) -> None:
        """488 for an offer this terminal cannot take, the reason in a Warning header."""
        why = str(exc)
        self.counters["refused-sdp"] += 1
        log.info("%s: 488 to %s for %s: %s", self.name, tx.request.method, call_id, why)
        self.events.emit("call-refused", call_id=call_id, status=488, why=why)
        tx.reply(488, "Not Acceptable Here",
                 headers=[("Warning", warning(self.local_ip, why))])

    def _on_ack(self, dlg: Dialog) -> None:
        session = self.media.get(dlg.call_id)
        if session is not None and session.sender is None:
            session.start_sending()

    # -- helpers ----------------------------------------------------------------------------
    def _ua(self) -> UserAgent:
        if self.ua is None:
            raise CommandError("terminal is not started")
        return self.ua

    def _target(self, to: str) -> str:
        """A terminal name, user or AOR of the lab, or a SIP URI (checked here)."""
        term = self.config.terminal_of(to)
        if term is not None:
            return self.config.aor(term.name)
        if not to.startswith("sip:"):
            raise CommandError(f"unknown terminal {to!r}")
        try:
            uri = parse_uri(to)
        except ValueError as exc:
            raise CommandError(f"bad SIP URI: {exc}") from None
        if not isinstance(uri, SipUri) or uri.headers:
            raise CommandError(f"{to!r} cannot be a Request-URI (SIP URI without headers)")
        return to


def _warning_of(resp: Response) -> dict[str, str]:
    """The Warning a refusal came with (488 says why in it), if any."""
    text = resp.get("warning")
    return {"warning": text} if text else {}


async def run(args: argparse.Namespace) -> int:
    try:
        config = LabConfig.load(args.config)
        config.require_terminal(args.name)
        psk = None
        if args.mode == "ipsec-m2ms":
            psk = Credentials.load(args.credentials).psk(args.name)
            if psk is None:
                raise ConfigError(f"{args.credentials}: no PSK for {args.name!r}")
    except ConfigError as exc:
        print(f"terminal: {exc}", file=sys.stderr)
        return 2
    events = EventLog(args.name, args.events)
    timers = TimerConfig(t1=args.t1, timer_d=64 * args.t1)
    ipsec = NodeIpsec.create(args.ipsec, args.name, args.esp_sa) if psk is not None else None
    try:
        return await _serve(args, config, psk, ipsec, events, timers)
    finally:
        if ipsec is not None:
            ipsec.close()  # every SA and policy this terminal installed


async def _serve(args: argparse.Namespace, config: LabConfig, psk: bytes | None,
                 ipsec: NodeIpsec | None, events: EventLog, timers: TimerConfig) -> int:
    term = Terminal(args.name, config, args.local, (args.proxy, args.proxy_port), args.port,
                    events, timers, Path(args.media_dir) if args.media_dir else None,
                    not args.media_once, mode=args.mode, psk=psk, ipsec=ipsec,
                    interfaces=dict(args.iface))
    with starting(f"listen on {args.local}:{args.port}"):
        await term.start()
    try:
        return await _run_terminal(args, term)
    finally:  # SIGTERM, or a failure: BYEs (bounded), media, SAs
        await term.close()
        events.emit("terminal-stopped")
        events.close()


async def _run_terminal(args: argparse.Namespace, term: Terminal) -> int:
    if args.auto_switch != "off":
        await term.linkswitch.arm(args.auto_switch, args.media_timeout)
    control = ControlServer(args.control, args.name) if args.control else None
    if control is not None:
        control.command("register", term.register,
                        optional={"expires": int, "via": str, "body": str},
                        help="REGISTER with the proxy (through interface via, with a body)")
        control.command("unregister", term.unregister, help="REGISTER with Expires: 0")
        control.command("call", term.call, required={"to": str}, optional={"media": str},
                        help="INVITE a terminal (media: audio or video)")
        control.command("hangup", term.hangup, required={"call_id": str}, help="BYE")
        control.command("message", term.message, required={"to": str, "text": str},
                        help="MESSAGE a terminal")
        control.command("switch", term.smig.switch, required={"call_id": str, "to": str},
                        optional={"media": str, "method": str},
                        help="Fig 3: move the call to terminal `to` (method reuse|renegotiate)")
        control.command("end", term.smig.end, required={"session": str},
                        help="end an anchored session everywhere (through the SMS)")
        control.command("link_switch", term.linkswitch.switch, required={"via": str},
                        optional={"method": str},
                        help="Fig 4: move every session to interface `via` "
                        "(method proposed | register-then-switch | reinvite)")
        control.command("auto_switch", term.linkswitch.set_auto, required={"method": str},
                        optional={"media_timeout": (float, int)},
                        help="switch links by this method on carrier loss or media timeout")
        control.command("send_smig", term.smig.send_raw, required={"server": str, "body": str},
                        help="send a hand-made SMIG body to the sms or presence")

        async def export(call_id: str) -> dict[str, Any]:
            return term.smig.export(call_id)

        control.command("export_keys", export, required={"call_id": str},
                        help="a call's security information and keys (lab tool)")

        async def status() -> dict[str, Any]:
            return term.status()

        control.command("status", status, help="registration, calls, counters")
        await control.start()
    print(f"terminal {args.name}: {args.local}:{args.port}, proxy {args.proxy}", flush=True)
    await until_stopped()
    if control is not None:
        await control.close()
    return 0


def _media_timeout(text: str) -> float:
    try:
        return check_media_timeout(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.terminal",
                                     description="smig-lab terminal (SIP UA)")
    node_arguments(parser, credentials=True)
    parser.add_argument("--name", required=True, help="terminal name, e.g. a1")
    parser.add_argument("--local", type=local_ipv4, required=True,
                        help="local IPv4 address for SIP")
    parser.add_argument("--port", type=port_number, default=5060)
    parser.add_argument("--proxy", type=ipv4, required=True, help="proxy IPv4 address")
    parser.add_argument("--proxy-port", type=port_number, default=5060)
    parser.add_argument("--media-dir", type=existing_dir,
                        help="where received WAVs and media packet logs go")
    parser.add_argument("--iface", type=interface_address, action="append", default=[],
                        help="IFNAME=IPV4 of an interface usable for SIP and media, repeatable")
    parser.add_argument("--auto-switch", default="off",
                        choices=("off", "proposed", "register-then-switch", "reinvite"),
                        help="switch links by this method on carrier loss or media timeout")
    parser.add_argument("--media-timeout", type=_media_timeout, default=0.3,
                        help="seconds without RTP that count as a failed link")
    parser.add_argument("--media-once", action="store_true",
                        help="play the speech sample once per call instead of looping it")
    args = parser.parse_args(argv)
    start_logging(args)
    return run_node("terminal", run(args))


if __name__ == "__main__":
    sys.exit(main())
