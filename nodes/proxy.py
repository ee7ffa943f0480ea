"""Proxy/registrar node: REGISTER bindings and stateful proxying between terminals.

Rules (DESIGN §1 Fig 1, §2 "Routes and trust"):

* A datagram from a source with no registration is **dropped unread** (counted, logged, no
  response) — unless it is a REGISTER or comes from a configured server (SMS, presence).
  Responses are taken only from the servers and from registered terminals (in ipsec-m2ms
  mode on the protected client port, the one the proxy sends requests to terminals from).
* A request whose From is not the AOR registered at its source gets `403`.
* A terminal's request outside a dialog must address a user of our domain (or a terminal's
  registered contact, which stands for that terminal); between users who are not friends it
  gets `403`. A Route past this proxy gets `403` (`416` if it is not a SIP URI): the proxy is
  nobody's relay.
* A request inside a dialog (To tag), and an ACK for a 2xx, must belong to an INVITE dialog
  this proxy record-routed and go from one of its parties to the other: `403` otherwise
  (an ACK is dropped).
* Everything else is proxied statefully, with Record-Route on dialog-creating requests. A
  2xx retransmission after the INVITE transaction is relayed only for a dialog proxied here,
  and only to where the caller's responses went.

`--mode open` runs without sec-agree (for SIPp interop and the benchmark) through the same
code path; the mode is printed at start and in every status reply.

    python -m nodes.proxy --config config/lab.json --listen 10.0.0.10 --mode open \\
        --events run/events/proxy.jsonl --control run/ctl/proxy.sock
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from nodes import smig
from nodes.cli import (
    local_ipv4,
    node_arguments,
    port_number,
    run_node,
    start_logging,
    starting,
    tune_gc_for_server,
)
from nodes.control import ControlServer, until_stopped
from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import ConfigError, Credentials, LabConfig
from nodes.labconfig import Terminal as TerminalConfig
from nodes.registrar import Binding, Registrar
from nodes.secreg import SEC_AGREE, SERVER_PORT_C, SERVER_PORT_S, Pending, SecRegServer
from nodes.sip.checks import Policy
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.headers import NameAddr
from nodes.sip.message import Message, Request, Response
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ClientTransaction, ServerTransaction, TransactionTimeout
from nodes.sip.transport import Addr, UdpTransport
from nodes.sip.uri import SipUri
from nodes.trust import load_key, static_sas

log = logging.getLogger("proxy")

DIALOG_CREATING = ("INVITE",)
PROXY_POLICY = Policy(role="proxy", supported=frozenset({SEC_AGREE}))
MAX_DIALOGS = 10_000  # dialogs remembered at most; the oldest is forgotten first
UNREGISTERED = "unregistered source"


@dataclass(frozen=True)
class Hop:
    """Where to send a forwarded request, from which of our endpoints, and (when the next
    hop is a terminal) whose binding it is."""

    endpoint: SipEndpoint
    addr: Addr
    aor: str | None = None


@dataclass
class ProxiedDialog:
    """An INVITE dialog this proxy record-routed. In-dialog requests must belong to one and
    go from one party to the other; a late 2xx retransmission of its INVITE goes to where
    the caller's responses went, never where the 2xx's own Via says."""

    call_id: str
    parties: dict[str, str]  # dialog tag -> AOR of the party that chose it
    invite_branch: str  # the branch of our Via on the initial INVITE
    callee_addr: Addr  # where that INVITE went
    upstream: Hop  # where the caller's responses go, and from which endpoint

    def peer(self, tag: str, sender: str) -> str | None:
        """The other party's AOR, if `sender` is the party that chose `tag`."""
        if self.parties.get(tag) != sender:
            return None
        others = [aor for t, aor in self.parties.items() if t != tag]
        return others[0] if others else None


def dialog_key(call_id: str, tag_a: str, tag_b: str) -> tuple[str, str, str]:
    """The same key whichever party sends (its tag is the From tag)."""
    return (call_id, tag_a, tag_b) if tag_a <= tag_b else (call_id, tag_b, tag_a)


def _header(msg: Message, read: Callable[[Message], Any]) -> Any:
    """A header for a log line or event, None where it is malformed (it was refused or is
    being dropped for that, or for something else: the record must not fail too)."""
    try:
        return read(msg)
    except ValueError:
        return None


class DropBook:
    """Drops: a datagram dropped unread is counted once (a retransmission is the same
    octets from the same place), and an address gets at most BURST log lines a second (a
    flood must not become a log flood)."""

    REMEMBERED = 4096
    BURST = 5

    def __init__(self) -> None:
        self._seen: dict[int, None] = {}  # hashes of recent drops, oldest first
        self._window: dict[str, tuple[int, int]] = {}  # ip -> (second, lines logged in it)
        self._unlogged: Counter[str] = Counter()

    def first_time(self, data: bytes, source: Addr) -> bool:
        h = hash((source, data))
        if h in self._seen:
            return False
        if len(self._seen) >= self.REMEMBERED:
            del self._seen[next(iter(self._seen))]
        self._seen[h] = None
        return True

    def may_log(self, ip: str) -> int | None:
        """None: stay quiet; otherwise log now, this many drops went unlogged before."""
        second = int(time.monotonic())
        window, lines = self._window.get(ip, (second, 0))
        if window != second:
            lines = 0
        if lines >= self.BURST:
            self._unlogged[ip] += 1
            return None
        if len(self._window) >= self.REMEMBERED and ip not in self._window:
            self._window.clear()  # very many addresses: start over
            self._unlogged.clear()
        self._window[ip] = (second, lines + 1)
        return self._unlogged.pop(ip, 0)


class Proxy:
    def __init__(
        self,
        config: LabConfig,
        listen: str,
        port: int = 5060,
        mode: str = "open",
        events: EventLog | None = None,
        timers: TimerConfig | None = None,
        creds: Credentials | None = None,
        ipsec: NodeIpsec | None = None,
        trust_key: bytes | None = None,
        notify: bool = False,
        protected_ports: tuple[int, int] = (SERVER_PORT_S, SERVER_PORT_C),
    ) -> None:
        if mode not in ("open", "ipsec-m2ms"):
            raise ValueError(f"unknown proxy mode {mode!r} (expected open or ipsec-m2ms)")
        if mode == "ipsec-m2ms" and (creds is None or ipsec is None):
            raise ValueError("ipsec-m2ms mode needs credentials and an IPsec backend")
        self.config = config
        self.creds, self.ipsec = creds, ipsec
        self.trust_key = trust_key
        self.notify_servers = notify  # tell the SMS and presence about registrations/calls
        self.protected_ports = protected_ports  # (port-s, port-c) in ipsec-m2ms mode
        self.secreg: SecRegServer | None = None
        self.ep_s: SipEndpoint | None = None  # protected server port (terminals' requests)
        self.ep_c: SipEndpoint | None = None  # protected client port (requests to terminals)
        self.listen, self.port, self.mode = listen, port, mode
        self.events = events or EventLog("proxy")
        self.timers = timers or TimerConfig()
        self.counters: Counter[str] = Counter()
        self.registrar = Registrar(lambda aor: config.terminal_of(aor) is not None)
        self.trusted = set(config.servers.values()) - {listen}
        self.endpoint: SipEndpoint | None = None
        self.link_moved: dict[str, Binding] = {}  # AOR -> binding it moved to (Fig 4)
        self.dialogs: dict[tuple[str, str, str], ProxiedDialog] = {}
        self.drops = DropBook()
        self._tasks: set[asyncio.Future[None]] = set()

    # -- life cycle -------------------------------------------------------------------------
    async def _endpoint(self, port: int, name: str) -> SipEndpoint:
        transport = await UdpTransport.create(self.listen, port)
        ep = SipEndpoint(transport, self._handle, timers=self.timers, policy=PROXY_POLICY,
                         auto_trying=False, answer_cancel=False, name=name)
        ep.ack_handler = partial(self._on_ack, ep)
        ep.admit = partial(self._admit, ep)
        ep.stray_response_handler = partial(self._on_stray_response, ep)
        transport.gate = partial(self._gate, ep)
        return ep

    async def start(self) -> None:
        self.endpoint = await self._endpoint(self.port, "proxy")
        self.our_ports = {self.port}
        rr_port = self.port
        if self.mode == "ipsec-m2ms":
            assert self.creds is not None and self.ipsec is not None
            port_s, port_c = self.protected_ports
            self.secreg = SecRegServer(self.ipsec, self.config, self.creds, self.listen,
                                       self.events, pending_timeout=self.timers.f + 1.0,
                                       port_s=port_s, port_c=port_c)
            self.ep_s = await self._endpoint(port_s, "proxy-s")
            self.ep_c = await self._endpoint(port_c, "proxy-c")
            self.our_ports |= {port_s, port_c}
            rr_port = port_s
            if self.trust_key is not None:
                for server in ("sms", "presence"):
                    sas, policies = static_sas(self.trust_key, self.listen,
                                               self.config.servers[server])
                    self.ipsec.install(sas, policies)
                    self.events.emit("static-sas", peer=server, spis=[sa.spi for sa in sas])
        self.record_route = f"<sip:{self.listen}:{rr_port};lr>"
        self.events.emit("proxy-started", mode=self.mode, listen=f"{self.listen}:{self.port}",
                         ipsec=self.ipsec.backend_name if self.ipsec else None)

    async def close(self) -> None:
        if self.secreg is not None:
            self.secreg.close()
        for ep in (self.endpoint, self.ep_s, self.ep_c):
            if ep is not None:
                await ep.close()
        self.endpoint = self.ep_s = self.ep_c = None

    # -- admission (DESIGN §2) ----------------------------------------------------------------
    def _gate(self, ep: SipEndpoint, data: bytes, source: Addr) -> bool:
        """Every datagram, before it is parsed: REGISTER from anywhere, other requests only
        from registered sources and the servers, responses only from the servers and the
        terminals we send requests to. The rest is dropped unread — the SIP layer would
        answer a malformed request itself, and look up a response nobody asked for."""
        if data[:1] in (b"\r", b"\n"):
            data = data.lstrip(b"\r\n")  # RFC 3261 §7.5: leading CRLFs do not count
        if data.startswith(b"REGISTER ") or source[0] in self.trusted:
            return True
        if data.startswith(b"SIP/"):
            if self._answers_from(ep, source):
                return True
            why, counter = "response from a source we sent nothing to", "dropped-response"
        elif self.registrar.aor_at(source) is not None:
            return True
        else:
            why, counter = UNREGISTERED, "dropped-unregistered"
        if self.drops.first_time(data, source):
            self.counters[counter] += 1
            what = data[:data.find(b" ", 0, 32)].decode("ascii", "replace") or "datagram"
            self._note_drop(source, what, why)
        return False

    def _answers_from(self, ep: SipEndpoint, source: Addr) -> bool:
        """Whether a terminal at `source` may send responses to `ep`: the proxy sends it
        requests at its registered contact (in ipsec-m2ms mode from the protected client
        port only; in open mode terminals use one address for everything)."""
        if self.registrar.binding_for_contact(*source) is not None:
            return self.secreg is None or ep is self.ep_c
        return self.secreg is None and self.registrar.aor_at(source) is not None

    def _admit(self, ep: SipEndpoint, req: Request, source: Addr) -> bool:
        """Which new requests the endpoint may handle at all: REGISTER from anywhere;
        anything else only from a registered source (on the protected port in ipsec-m2ms
        mode) or a configured server. The rest — CANCEL included, which the endpoint would
        otherwise answer itself — is dropped without a word."""
        self.counters[f"rx-{req.method}"] += 1
        if req.method == "REGISTER" or source[0] in self.trusted:
            return True
        if self.registrar.aor_at(source) is None:
            why = UNREGISTERED
        elif self.secreg is not None and ep is not self.ep_s:
            why = "not on the protected port"
        else:
            return True
        self._count_drop(req, source, why)
        return False

    def _drop(self, tx: ServerTransaction, why: str) -> None:
        self._count_drop(tx.request, tx.source, why)
        tx.discard()

    def _count_drop(self, req: Request, source: Addr, why: str) -> None:
        self.counters["dropped-unregistered" if why == UNREGISTERED
                      else "dropped-unprotected"] += 1
        self._note_drop(source, req.method, why, _header(req, lambda m: m.call_id))

    def _note_drop(self, source: Addr, what: str, why: str,
                   call_id: str | None = None) -> None:
        """One log line and event for a drop, unless this address had its share already."""
        unlogged = self.drops.may_log(source[0])
        if unlogged is None:
            return
        more = f" ({unlogged} more from {source[0]} unlogged)" if unlogged else ""
        log.info("dropped %s from %s:%d: %s%s", what, *source, why, more)
        self.events.emit("dropped", why=why, method=what, call_id=call_id,
                         source=list(source), unlogged=unlogged or None)

    def _refuse(self, tx: ServerTransaction, status: int, reason: str, counter: str,
                why: str, **details: Any) -> None:
        self.counters[counter] += 1
        req = tx.request
        self.events.emit("refused", status=status, why=why, method=req.method,
                         call_id=_header(req, lambda m: m.call_id), source=list(tx.source),
                         **details)
        log.info("refused %s from %s:%d with %d: %s", req.method, *tx.source, status, why)
        tx.reply(status, reason)

    def _sender_problem(self, req: Request, source: Addr) -> str | None:
        """Why a request from a (registered) terminal is not its own, or None."""
        frm = req.from_
        if frm is None or not isinstance(frm.uri, SipUri) or \
                frm.uri.aor() != self.registrar.aor_at(source):
            return "From is not the registered user"
        return None

    # -- requests ---------------------------------------------------------------------------
    def _handle(self, tx: ServerTransaction) -> Awaitable[None] | None:
        """Answers REGISTERs and refusals in place; a request to forward comes back as the
        coroutine that forwards it (the endpoint runs it as a task)."""
        req = tx.request
        if req.method == "REGISTER":
            self._register(tx)
            return None
        trusted = tx.source[0] in self.trusted
        if not trusted:  # admitted: registered at this source
            why = self._sender_problem(req, tx.source)
            if why is not None:
                self._refuse(tx, 403, "From does not match the registered user",
                             "forbidden-from", why)
                return None
        if req.method == "INVITE":
            tx.reply(100)
        hop = self._route(tx, trusted)
        if hop is None:
            return None
        return self._forward(tx, hop)

    def _is_us(self, uri: object) -> bool:
        return isinstance(uri, SipUri) and uri.host == self.listen and \
            (uri.port or 5060) in self.our_ports

    def _strip_own_route(self, req: Request) -> list[NameAddr]:
        """Removes the top Route if it names us (our Record-Route, as the dialog's parties
        send it back); returns the Routes left (ValueError if they are malformed)."""
        routes = req.routes
        if routes and self._is_us(routes[0].uri):
            req.pop_top("route")
            routes = routes[1:]
        return routes

    def _route(self, tx: ServerTransaction, trusted: bool) -> Hop | None:
        """Decide the next hop, or answer the request ourselves and return None."""
        req = tx.request
        routes = self._strip_own_route(req)
        if routes:  # we are the only proxy here: a Route elsewhere is a relay request
            if not isinstance(routes[0].uri, SipUri):
                self._refuse(tx, 416, "Unsupported URI Scheme in Route", "refused-route",
                             f"Route {routes[0].uri} is not a SIP URI")
            else:
                self._refuse(tx, 403, "Route does not lead through this proxy",
                             "forbidden-route", f"Route to {routes[0].uri}")
            return None
        if not isinstance(req.uri, SipUri):
            tx.reply(416)
            return None
        if req.to is not None and req.to.tag is not None and not trusted:
            return self._route_in_dialog(tx)
        return self._route_out_of_dialog(tx, req.uri, trusted)

    def _route_out_of_dialog(self, tx: ServerTransaction, uri: SipUri,
                             trusted: bool) -> Hop | None:
        """A user of our domain (a server or a terminal), or a terminal's registered
        contact; from a terminal, only to a friend's terminal (or its own user's)."""
        req = tx.request
        assert self.endpoint is not None
        if uri.host.lower() == self.config.domain:
            server = self.config.servers.get(uri.user or "")
            if server is not None and server != self.listen:
                return Hop(self.endpoint, (server, 5060))
            callee = self.config.terminal_of(uri.aor())
            if callee is None:
                tx.reply(404, "No such user")
                return None
            if not trusted and not self._allowed(tx, callee):
                return None
            bindings = self.registrar.bindings(uri.aor())
            if not bindings:
                tx.reply(480, "Not registered")
                return None
            binding = max(bindings, key=lambda b: b.registered_ns)
            req.set_uri(binding.contact.uri)
            return self._hop_to(binding)
        # A contact URI: it stands for the terminal registered there, with its policy.
        binding = self._binding_for_contact(uri)
        if binding is None:
            tx.reply(404, "Unknown target")
            return None
        callee = self.config.terminal_of(binding.aor)
        if not trusted and (callee is None or not self._allowed(tx, callee)):
            return None
        return self._hop_to(self._moved(binding))

    def _allowed(self, tx: ServerTransaction, callee: TerminalConfig) -> bool:
        """The friends-only policy between the sender's user and the callee's (DESIGN §1)."""
        req = tx.request
        frm = req.from_
        caller = self.config.terminal_of(frm.uri.aor()) if frm and isinstance(
            frm.uri, SipUri) else None
        if caller and self.config.may_contact(caller.name, callee.name):
            return True
        self._refuse(tx, 403, "Not a friend", "forbidden-policy", "not friends",
                     caller=caller.name if caller else None, callee=callee.name)
        return False

    def _route_in_dialog(self, tx: ServerTransaction) -> Hop | None:
        req = tx.request
        target = self._dialog_target(req)
        if isinstance(target, str):
            self._refuse(tx, 403, "Not in a dialog set up through this proxy",
                         "forbidden-dialog", target)
            return None
        return self._hop_to(target)

    def _dialog_target(self, req: Request) -> Binding | str:
        """For a terminal's in-dialog request (its From already checked): the binding of
        the dialog's other party it goes to, or why it may not go anywhere."""
        frm, to = req.from_, req.to
        assert frm is not None and to is not None and isinstance(frm.uri, SipUri)
        dlg = self.dialogs.get(dialog_key(req.call_id or "", frm.tag or "", to.tag or ""))
        if dlg is None:
            return "no dialog with these tags went through this proxy"
        peer = dlg.peer(frm.tag or "", frm.uri.aor())
        if peer is None:
            return "the sender is not the dialog party that chose its From tag"
        uri = req.uri
        binding = self._binding_for_contact(uri) if isinstance(uri, SipUri) else None
        if binding is not None and binding.aor != peer:
            return "the Request-URI is not the dialog peer's contact"
        if binding is None:  # its contact went (Fig 4: it moved): its latest binding
            bindings = self.registrar.bindings(peer)
            if not bindings:
                return "the dialog peer is not registered"
            binding = max(bindings, key=lambda b: b.registered_ns)
        moved = self._moved(binding)
        if moved is not binding or not self._same_contact(binding, uri):
            req.set_uri(moved.contact.uri)
        return moved

    @staticmethod
    def _same_contact(binding: Binding, uri: object) -> bool:
        return isinstance(uri, SipUri) and isinstance(binding.contact.uri, SipUri) and \
            uri.host_port() == binding.contact.uri.host_port()

    def _moved(self, binding: Binding) -> Binding:
        """In-dialog requests for a terminal follow its link switch (Fig 4)."""
        moved = self.link_moved.get(binding.aor)
        if moved is not None and moved is not binding and \
                moved in self.registrar.bindings(binding.aor):
            return moved
        return binding

    def _binding_for_contact(self, uri: SipUri) -> Binding | None:
        return self.registrar.binding_for_contact(uri.host, uri.port or 5060)

    def _hop_to(self, binding: Binding) -> Hop:
        """Terminals are reached at their Contact (host and port; the registrar took only IP
        hosts); in ipsec-m2ms mode from our protected client port, so the request rides the
        SA server port-c → client port-s."""
        ep = self.ep_c if self.ep_c is not None else self.endpoint
        assert ep is not None and isinstance(binding.contact.uri, SipUri)
        return Hop(ep, binding.contact.uri.host_port(), binding.aor)

    async def _forward(self, tx: ServerTransaction, hop: Hop) -> None:
        req = tx.request
        fwd = req.copy()
        mf = req.max_forwards
        if mf is not None:
            if mf <= 0:
                tx.reply(483)
                return
            fwd.set("Max-Forwards", mf - 1)
        initial_invite = req.method in DIALOG_CREATING and not (req.to and req.to.tag)
        if initial_invite:
            fwd.add("Record-Route", self.record_route, top=True)
        tx.retransmit_2xx = False  # a proxy relays 2xx retransmissions, it does not make them

        def relay(resp: Response) -> None:
            if resp.status > 100:
                tx.respond(self._upstream(resp))

        try:
            ctx = hop.endpoint.client_transaction(fwd, hop.addr, on_provisional=relay)
        except (OSError, ValueError) as exc:
            self.events.emit("forward-failed", method=req.method, error=str(exc))
            tx.reply(503)
            return
        self.counters[f"fwd-{req.method}"] += 1
        if req.method == "INVITE":
            # RFC 6026: 2xx retransmissions reaching the Accepted client transaction
            # go upstream too (the caller's ACK may have been lost).
            ctx.on_2xx_retransmission = partial(self._relay_2xx, tx)
            task = asyncio.ensure_future(self._relay_cancel(tx, hop.endpoint, ctx))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            resp = await ctx.final()
        except TransactionTimeout:
            tx.reply(408 if req.method != "INVITE" else 504)
            return
        finally:
            if req.method == "BYE":
                self._end_dialog(req)
        if initial_invite and 200 <= resp.status < 300:
            self._dialog_established(tx, hop, ctx, resp)
        tx.respond(self._upstream(resp))

    async def _relay_cancel(self, tx: ServerTransaction, ep: SipEndpoint,
                            ctx: ClientTransaction) -> None:
        cancelled = asyncio.ensure_future(tx.cancelled.wait())
        done = asyncio.ensure_future(ctx.final())
        await asyncio.wait({cancelled, done}, return_when=asyncio.FIRST_COMPLETED)
        if cancelled.done() and not done.done():
            ep.cancel(ctx)
        for f in (cancelled, done):
            f.cancel()

    @staticmethod
    def _upstream(resp: Response) -> Response:
        up = resp.copy()
        up.pop_top("via")
        return up

    # -- dialogs ----------------------------------------------------------------------------
    def _dialog_established(self, tx: ServerTransaction, hop: Hop, ctx: ClientTransaction,
                            resp: Response) -> None:
        """A 2xx to an initial INVITE we record-routed: remember the dialog (before the 2xx
        goes upstream, so the caller's ACK finds it) and tell the SMS."""
        req = tx.request
        frm, to = req.from_, _header(resp, lambda m: m.to)
        if frm is None or to is None or to.tag is None or hop.aor is None or \
                not isinstance(frm.uri, SipUri) or not req.call_id:
            log.info("2xx for INVITE %s without the tags of a dialog", req.call_id)
            return
        caller_tag = frm.tag or ""
        dlg = ProxiedDialog(req.call_id, {caller_tag: frm.uri.aor(), to.tag: hop.aor},
                            ctx.key[0], hop.addr, Hop(tx.owner, tx.response_addr))
        key = dialog_key(req.call_id, caller_tag, to.tag)
        self.dialogs.pop(key, None)
        if len(self.dialogs) >= MAX_DIALOGS:
            del self.dialogs[next(iter(self.dialogs))]
        self.dialogs[key] = dlg
        self._session_established(req)

    def _end_dialog(self, req: Request) -> None:
        frm, to = req.from_, req.to
        if frm is not None and to is not None and req.call_id:
            self.dialogs.pop(dialog_key(req.call_id, frm.tag or "", to.tag or ""), None)

    # -- ACK and responses ------------------------------------------------------------------
    def _on_ack(self, ep: SipEndpoint, req: Request, addr: Addr) -> None:
        """ACK for a 2xx: its own transaction-less request, routed like any in-dialog one
        (never answered: a refused or malformed one is dropped with a log line)."""
        try:
            why = self._relay_ack(ep, req, addr)
        except ValueError as exc:
            why = f"malformed ({exc})"
        if why is not None:
            self.counters["dropped-ack"] += 1
            self._note_drop(addr, "ACK", why, _header(req, lambda m: m.call_id))

    def _relay_ack(self, ep: SipEndpoint, req: Request, addr: Addr) -> str | None:
        """Forwards the ACK, or says why not."""
        trusted = addr[0] in self.trusted
        if not trusted:
            if self.registrar.aor_at(addr) is None:
                return UNREGISTERED
            if self.secreg is not None and ep is not self.ep_s:
                return "not on the protected port"
            why = self._sender_problem(req, addr)
            if why is not None:
                return why
        if self._strip_own_route(req):
            return "Route does not lead through this proxy"
        uri = req.uri
        if not isinstance(uri, SipUri) or req.to is None or req.to.tag is None:
            return "not an ACK inside a dialog"
        if trusted:
            binding = self._binding_for_contact(uri)
            if binding is None:
                return "unknown target"
        else:
            target = self._dialog_target(req)
            if isinstance(target, str):
                return target
            binding = target
        hop = self._hop_to(binding)
        hop.endpoint.send_stateless(req.copy(), hop.addr)
        self.counters["fwd-ACK"] += 1
        return None

    def _relay_2xx(self, tx: ServerTransaction, resp: Response) -> None:
        """A 2xx retransmission in the INVITE client transaction's Accepted state: to where
        the server transaction sends its responses (not where the 2xx's Via says)."""
        self.counters["fwd-2xx-retransmission"] += 1
        self._send_upstream(Hop(tx.owner, tx.response_addr), resp)

    def _on_stray_response(self, ep: SipEndpoint, resp: Response, addr: Addr) -> None:
        """A response no client transaction of ours is waiting for. Only a retransmitted 2xx
        of an INVITE we proxied goes on (its dialog known here, our branch at the top of its
        Via, from where the INVITE went), to where the caller's responses went."""
        dlg = _header(resp, lambda m: self._late_2xx_dialog(m, addr))
        if dlg is None:
            self.counters["dropped-stray-response"] += 1
            self._note_drop(addr, f"{resp.status} response", "matches nothing we proxied",
                            _header(resp, lambda m: m.call_id))
            return
        self.counters["fwd-2xx-retransmission"] += 1
        self._send_upstream(dlg.upstream, resp)

    def _late_2xx_dialog(self, resp: Response, addr: Addr) -> ProxiedDialog | None:
        cseq, frm, to = resp.cseq, resp.from_, resp.to
        if not 200 <= resp.status < 300 or cseq is None or cseq.method != "INVITE" or \
                frm is None or to is None or not resp.call_id:
            return None
        dlg = self.dialogs.get(dialog_key(resp.call_id, frm.tag or "", to.tag or ""))
        if dlg is None or dlg.callee_addr != addr or \
                resp.vias[0].branch != dlg.invite_branch:
            return None
        return dlg

    def _send_upstream(self, hop: Hop, resp: Response) -> None:
        try:
            hop.endpoint.send_response(self._upstream(resp), hop.addr)
        except (OSError, ValueError) as exc:
            log.info("relaying a %d to %s:%d failed: %s", resp.status, *hop.addr, exc)

    # -- REGISTER ---------------------------------------------------------------------------
    def _register(self, tx: ServerTransaction) -> None:
        if self.secreg is None:
            self._bind(tx)
            return
        req, key = tx.request, tx.source
        if tx.owner is not self.ep_s:  # unprotected: the start of Fig 1
            if req.has("authorization") or req.has("security-verify"):
                self.counters["register-unprotected-refused"] += 1
                tx.reply(403, "Protected REGISTER must use the protected port")
                return
            self.secreg.challenge(tx)
            return
        if key in self.secreg.pending:  # Fig 1 step 4
            self._complete_registration(tx, key)
            return
        assoc = self.secreg.assocs.get(key)
        if assoc is not None:  # refresh or deregistration over the channel
            if not self._registers_itself(tx, assoc.terminal):
                return
            self._bind(tx)
            if not self._bound_from(key):
                self.secreg.drop_assoc(key, "deregistered", after_answer=True)
            return
        self._drop(tx, UNREGISTERED)

    def _registers_itself(self, tx: ServerTransaction, terminal: str) -> bool:
        """A channel binds only its own terminal's AOR (another one's would be hijacked)."""
        to = tx.request.to
        if to is not None and isinstance(to.uri, SipUri) and \
                to.uri.aor() == self.config.aor(terminal):
            return True
        self._refuse(tx, 403, "To is not the registered terminal", "forbidden-register",
                     f"channel of {terminal} registering {to.uri if to else None}")
        return False

    def _complete_registration(self, tx: ServerTransaction, key: Addr) -> None:
        """Fig 1 steps 4-5. Whatever goes wrong after the Digest check, the pending SAs do
        not stay behind unless they became the registration's channel."""
        assert self.secreg is not None
        pend = self.secreg.verify(tx)
        if pend is None:
            return
        try:
            self._bind_verified(tx, key, pend)
        except Exception:  # a bug, not the client's input: answer, and leave no state
            log.exception("completing the registration from %s:%d failed", *key)
            if not tx.final_sent:
                tx.reply(500)
        finally:
            assoc = self.secreg.assocs.get(key)
            if assoc is None or assoc.saset is not pend.saset:
                self.registrar.remove_source(key)  # refused: nothing was bound from here
                self.secreg.discard_pending(pend)

    def _bind_verified(self, tx: ServerTransaction, key: Addr, pend: Pending) -> None:
        assert self.secreg is not None
        req = tx.request
        try:
            moving = self._link_switch_sessions(req)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            reason = str(exc) if isinstance(exc, ValueError) else "JSON nested too deep"
            self.events.emit("register-refused", status=400, reason=reason, source=list(key))
            log.info("REGISTER from %s:%d refused: bad link-switch body (%s)", *key, reason)
            tx.reply(400, "Bad link-switch body")
            return
        after = (lambda: self._link_switch(req, key, moving)) if moving else None
        if self._bind(tx, after) != 200:
            return
        for old_key, old in self.secreg.promote(key, pend, time.time_ns()):
            self.registrar.remove_source(old_key)
            self.secreg.remove(old, "re-registration")

    @staticmethod
    def _link_switch_sessions(req: Request) -> list[str]:
        """Fig 4: a protected REGISTER may carry the sessions to move (ValueError if the
        body is not a well-formed link-switch request)."""
        ctype = req.content_type
        if not req.body or ctype is None or ctype.mime != smig.CONTENT_TYPE:
            return []
        return smig.parse_link_switch_body(req.body)

    def _link_switch(self, req: Request, source: Addr, sessions: list[str]) -> bool:
        """Right after the registration completes, the REGISTER is the switch request: the
        SMS configures both ends. In-dialog requests for the terminal follow it too. The
        link-switch notice is also the SMS's registration notice (one message, not two);
        True if it went out."""
        term = self.config.terminal_of(str(req.to.uri)) if req.to else None
        if term is None or not self.notify_servers:
            return False
        binding = next((b for b in self.registrar.bindings(self.config.aor(term.name))
                        if b.source == source), None)
        if binding is not None:
            self.link_moved[binding.aor] = binding
        self.events.emit("fig4", step="link-switch-register", terminal=term.name,
                         sessions=sessions, address=source[0])
        for session in sessions:
            self._notify("sms", smig.LinkSwitch(session, term.name, source[0]))
        return True

    def _bound_from(self, source: Addr) -> bool:
        return self.registrar.bound_from(source)

    def purge(self) -> None:
        """Expired bindings go; so do the channels (SAs) no binding uses any more."""
        for b in self.registrar.purge():
            self.events.emit("expired", aor=b.aor, contact=str(b.contact.uri))
            self._registration_changed(b, False, b.call_id)
            if self.secreg is not None and not self._bound_from(b.source):
                self.secreg.drop_assoc(b.source, "registration expired")

    # -- telling the servers (DESIGN §2: the proxy informs the SMS and presence) -------------
    def _registration_changed(self, b: Binding, registered: bool, call_id: str,
                              servers: tuple[str, ...] = ("sms", "presence")) -> None:
        if not self.notify_servers:
            return
        term = self.config.terminal_of(b.aor)
        if term is None or not isinstance(b.contact.uri, SipUri):
            return
        msg = smig.Registration(call_id or "registration", term.name, registered,
                                b.contact.uri.host if registered else None)
        for server in servers:
            self._notify(server, msg)

    def _session_established(self, req: Request) -> None:
        if not self.notify_servers or req.from_ is None or req.to is None:
            return
        caller = self.config.terminal_of(str(req.from_.uri))
        callee = self.config.terminal_of(str(req.to.uri))
        if caller is None or callee is None or not req.call_id:
            return
        self._notify("sms", smig.SessionEstablished(req.call_id, caller.name, callee.name))

    def _notify(self, server: str, msg: smig.Smig) -> None:
        task = asyncio.ensure_future(self._send_notice(server, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_notice(self, server: str, msg: smig.Smig) -> None:
        assert self.endpoint is not None
        domain = self.config.domain
        req = Request("MESSAGE", f"sip:{server}@{domain}", [
            ("From", f"<sip:proxy@{domain}>;tag={new_tag()}"), ("To", f"<sip:{server}@{domain}>"),
            ("Call-ID", f"{new_tag()}@{self.listen}"), ("CSeq", "1 MESSAGE"),
            ("Content-Type", smig.CONTENT_TYPE)], msg.serialize())
        try:
            resp = await self.endpoint.request(req, (self.config.servers[server], 5060))
        except TransactionTimeout:
            self.events.emit("notify-failed", server=server, type=msg.TYPE)
            return
        if resp.status >= 300:
            self.events.emit("notify-refused", server=server, type=msg.TYPE,
                             status=resp.status)

    def _bind(self, tx: ServerTransaction, first: Callable[[], bool] | None = None) -> int:
        """Apply a REGISTER and answer it; `first` runs right after the 200, before the
        servers hear of the registration (Fig 4: the switch request goes out at once); if it
        returns True it has told the SMS, which then hears no separate registration notice."""
        req = tx.request
        outcome = self.registrar.register(req, tx.source)
        if outcome.status != 200:
            self.counters[f"register-{outcome.status}"] += 1
            self.events.emit("register-refused", status=outcome.status, reason=outcome.reason,
                             source=list(tx.source))
            tx.reply(outcome.status, outcome.reason)
            return outcome.status
        now = time.monotonic()
        contacts = [("Contact", f"<{b.contact.uri}>;expires={b.expires_in(now)}")
                    for b in outcome.bindings]
        tx.reply(200, headers=contacts)
        told_sms = first() if first is not None else False
        for b in outcome.added:
            self.events.emit("registered", aor=b.aor, contact=str(b.contact.uri),
                             source=list(b.source), expires=b.expires_in(now))
            self._registration_changed(b, True, req.call_id or "",
                                       ("presence",) if told_sms else ("sms", "presence"))
        for b in outcome.removed:
            self.events.emit("unregistered", aor=b.aor, contact=str(b.contact.uri))
            self._registration_changed(b, False, req.call_id or "")
        self.counters["registered"] += len(outcome.added)
        return 200

    # -- status for the runner and the other servers ---------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "mode": self.mode,
            "registrations": {
                aor: [{"contact": str(b.contact.uri), "source": list(b.source),
                       "expires_in": b.expires_in(now)} for b in bindings]
                for aor, bindings in self.registrar.all_bindings().items()
            },
            "counters": dict(self.counters),
            "ipsec": self.ipsec.describe() if self.ipsec else None,
            "channels": {f"{k[0]}:{k[1]}": a.terminal
                         for k, a in (self.secreg.assocs.items() if self.secreg else [])},
            "pending": len(self.secreg.pending) if self.secreg else 0,
            "dialogs": len(self.dialogs),
        }


async def run(args: argparse.Namespace) -> int:
    try:
        config = LabConfig.load(args.config)
        creds = Credentials.load(args.credentials) if args.mode == "ipsec-m2ms" else None
        trust = load_key(args.trust) if args.mode == "ipsec-m2ms" and args.notify else None
    except ConfigError as exc:
        print(f"proxy: {exc}", file=sys.stderr)
        return 2
    events = EventLog("proxy", args.events)
    timers = TimerConfig(t1=args.t1, timer_d=64 * args.t1)
    ipsec = None
    if args.mode == "ipsec-m2ms":
        ipsec = NodeIpsec.create(args.ipsec, "proxy", args.esp_sa)
    try:
        return await _serve(args, config, creds, ipsec, events, timers, trust)
    finally:
        if ipsec is not None:
            ipsec.close()  # every SA and policy this proxy installed


async def _serve(args: argparse.Namespace, config: LabConfig, creds: Credentials | None,
                 ipsec: NodeIpsec | None, events: EventLog, timers: TimerConfig,
                 trust: bytes | None) -> int:
    proxy = Proxy(config, args.listen, args.port, args.mode, events, timers, creds, ipsec,
                  trust, args.notify)
    with starting(f"listen on {args.listen}:{args.port}"):
        await proxy.start()
    control = None
    if args.control:
        control = ControlServer(args.control, "proxy")

        async def status() -> dict[str, Any]:
            return proxy.status()

        control.command("status", status, help="registrations and counters")
        await control.start()
    print(f"proxy: {args.mode} mode on {args.listen}:{args.port}", flush=True)
    tune_gc_for_server()
    purge = asyncio.ensure_future(_purge_loop(proxy))
    await until_stopped()
    purge.cancel()
    if control is not None:
        await control.close()
    await proxy.close()
    events.emit("proxy-stopped", counters=dict(proxy.counters))
    events.close()
    return 0


async def _purge_loop(proxy: Proxy) -> None:
    while True:
        await asyncio.sleep(1.0)
        proxy.purge()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.proxy",
                                     description="smig-lab proxy/registrar")
    node_arguments(parser, credentials=True, trust=True)
    parser.add_argument("--listen", type=local_ipv4, required=True,
                        help="IPv4 address to listen on")
    parser.add_argument("--port", type=port_number, default=5060)
    parser.add_argument("--notify", action="store_true",
                        help="the SMS and presence run: tell them about registrations and "
                        "calls (over static SAs keyed from --trust in ipsec-m2ms mode)")
    args = parser.parse_args(argv)
    start_logging(args)
    return run_node("proxy", run(args))


if __name__ == "__main__":
    sys.exit(main())
