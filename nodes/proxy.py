"""Proxy/registrar node: REGISTER bindings and stateful proxying between terminals.

Rules (DESIGN §1 Fig 1, §2 "Routes and trust"):

* A request other than REGISTER from a source with no registration is **dropped silently**
  (counted, logged, no response) — unless it comes from a configured server (SMS, presence).
* A request whose From is not the AOR registered at its source gets `403`.
* An initial INVITE or MESSAGE between users who are not friends gets `403`.
* Everything else is proxied statefully, with Record-Route on dialog-creating requests.

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
from nodes.cli import node_arguments, start_logging, tune_gc_for_server
from nodes.control import ControlServer, until_stopped
from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import ConfigError, Credentials, LabConfig
from nodes.registrar import Binding, Registrar
from nodes.secreg import SEC_AGREE, SecRegServer
from nodes.sip.checks import Policy
from nodes.sip.dialog import uri_address
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.headers import NameAddr
from nodes.sip.message import Request, Response
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ClientTransaction, ServerTransaction, TransactionTimeout
from nodes.sip.transport import Addr, UdpTransport
from nodes.sip.uri import SipUri
from nodes.trust import load_key, static_sas

log = logging.getLogger("proxy")

DIALOG_CREATING = ("INVITE",)
PROXY_POLICY = Policy(role="proxy", supported=frozenset({SEC_AGREE}))
POLICY_CHECKED = ("INVITE", "MESSAGE")


@dataclass(frozen=True)
class Hop:
    """Where to send a forwarded request, and from which of our endpoints."""

    endpoint: SipEndpoint
    addr: Addr


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
    ) -> None:
        if mode not in ("open", "ipsec-m2ms"):
            raise ValueError(f"unknown proxy mode {mode!r} (expected open or ipsec-m2ms)")
        if mode == "ipsec-m2ms" and (creds is None or ipsec is None):
            raise ValueError("ipsec-m2ms mode needs credentials and an IPsec backend")
        self.config = config
        self.creds, self.ipsec = creds, ipsec
        self.trust_key = trust_key
        self.notify_servers = notify  # tell the SMS and presence about registrations/calls
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
        self._tasks: set[asyncio.Future[None]] = set()

    # -- life cycle -------------------------------------------------------------------------
    async def _endpoint(self, port: int, name: str) -> SipEndpoint:
        ep = SipEndpoint(await UdpTransport.create(self.listen, port), self._handle,
                         timers=self.timers, policy=PROXY_POLICY, auto_trying=False,
                         answer_cancel=False, name=name)
        ep.ack_handler = self._on_ack
        ep.admit = partial(self._admit, ep)
        ep.stray_response_handler = partial(self._on_stray_response, ep)
        return ep

    async def start(self) -> None:
        self.endpoint = await self._endpoint(self.port, "proxy")
        self.our_ports = {self.port}
        rr_port = self.port
        if self.mode == "ipsec-m2ms":
            assert self.creds is not None and self.ipsec is not None
            self.secreg = SecRegServer(self.ipsec, self.config, self.creds, self.listen,
                                       self.events, pending_timeout=self.timers.f + 1.0)
            self.ep_s = await self._endpoint(self.secreg.port_s, "proxy-s")
            self.ep_c = await self._endpoint(self.secreg.port_c, "proxy-c")
            self.our_ports |= {self.secreg.port_s, self.secreg.port_c}
            rr_port = self.secreg.port_s
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

    # -- requests ---------------------------------------------------------------------------
    def _admit(self, ep: SipEndpoint, req: Request, source: Addr) -> bool:
        """Which new requests the endpoint may handle at all (DESIGN §2): REGISTER from
        anywhere; anything else only from a registered source (on the protected port in
        ipsec-m2ms mode) or a configured server. The rest — CANCEL included, which the
        endpoint would otherwise answer itself — is dropped without a word."""
        self.counters[f"rx-{req.method}"] += 1
        if req.method == "REGISTER" or source[0] in self.trusted:
            return True
        if self.registrar.aor_at(source) is None:
            why = "unregistered source"
        elif self.secreg is not None and ep is not self.ep_s:
            why = "not on the protected port"
        else:
            return True
        self._count_drop(req, source, why)
        return False

    def _handle(self, tx: ServerTransaction) -> Awaitable[None] | None:
        """Answers REGISTERs and refusals in place; a request to forward comes back as the
        coroutine that forwards it (the endpoint runs it as a task)."""
        req = tx.request
        if req.method == "REGISTER":
            self._register(tx)
            return None
        source = tx.source
        if source[0] not in self.trusted:  # admitted: registered at this source
            aor = self.registrar.aor_at(source)
            frm = req.from_
            if frm is None or not isinstance(frm.uri, SipUri) or frm.uri.aor() != aor:
                self.counters["forbidden-from"] += 1
                self.events.emit("refused", status=403, why="From is not the registered user",
                                 method=req.method, call_id=req.call_id, source=list(source))
                tx.reply(403, "From does not match the registered user")
                return None
        if req.method == "INVITE":
            tx.reply(100)
        self._strip_own_route(req)
        hop = self._route(tx)
        if hop is None:
            return None
        return self._forward(tx, hop)

    def _drop(self, tx: ServerTransaction, why: str) -> None:
        self._count_drop(tx.request, tx.source, why)
        tx.discard()

    def _count_drop(self, req: Request, source: Addr, why: str) -> None:
        self.counters["dropped-unregistered" if why == "unregistered source"
                      else "dropped-unprotected"] += 1
        log.info("dropped %s from %s:%d: %s", req.method, *source, why)
        self.events.emit("dropped", why=why, method=req.method, call_id=req.call_id,
                         source=list(source))

    def _strip_own_route(self, req: Request) -> None:
        routes = req.values("route")
        if routes:
            top = NameAddr.parse(routes[0]).uri
            if isinstance(top, SipUri) and top.host == self.listen and \
                    (top.port or 5060) in self.our_ports:
                req.pop_top("route")

    def _route(self, tx: ServerTransaction) -> Hop | None:
        """Decide the next hop, or answer the request ourselves and return None."""
        req = tx.request
        assert self.endpoint is not None
        if req.values("route"):  # someone else's loose route: follow it
            return Hop(self.endpoint, uri_address(NameAddr.parse(req.values("route")[0]).uri))
        uri = req.uri
        if not isinstance(uri, SipUri):
            tx.reply(416)
            return None
        if uri.host.lower() == self.config.domain:
            user = uri.user or ""
            if user in self.config.servers:
                return Hop(self.endpoint, (self.config.servers[user], 5060))
            callee = self.config.terminal_of(uri.aor())
            if callee is None:
                tx.reply(404, "No such user")
                return None
            to_tag = req.to.tag if req.to else None
            if req.method in POLICY_CHECKED and to_tag is None and not self._allowed(req, tx):
                return None
            bindings = self.registrar.bindings(uri.aor())
            if not bindings:
                tx.reply(480, "Not registered")
                return None
            binding = max(bindings, key=lambda b: b.registered_ns)
            req.set_uri(binding.contact.uri)
            return self._hop_to(binding)
        # In-dialog: the Request-URI is a terminal's contact — or where it moved (Fig 4).
        binding = self._binding_for_contact(uri)
        if binding is None:
            tx.reply(404, "Unknown target")
            return None
        moved = self.link_moved.get(binding.aor)
        if moved is not None and moved is not binding and moved in self.registrar.bindings(
                binding.aor):
            binding = moved
            req.set_uri(binding.contact.uri)
        return self._hop_to(binding)

    def _allowed(self, req: Request, tx: ServerTransaction) -> bool:
        if tx.source[0] in self.trusted:
            return True
        frm = req.from_
        caller = self.config.terminal_of(frm.uri.aor()) if frm and isinstance(
            frm.uri, SipUri) else None
        callee = self.config.terminal_of(req.uri.aor()) if isinstance(req.uri, SipUri) else None
        if caller and callee and self.config.may_contact(caller.name, callee.name):
            return True
        self.counters["forbidden-policy"] += 1
        self.events.emit("refused", status=403, why="not friends", method=req.method,
                         call_id=req.call_id, caller=caller.name if caller else None,
                         callee=callee.name if callee else None)
        tx.reply(403, "Not a friend")
        return False

    def _binding_for_contact(self, uri: SipUri) -> Binding | None:
        return self.registrar.binding_for_contact(uri.host, uri.port or 5060)

    def _hop_to(self, binding: Binding) -> Hop:
        """Terminals are reached at their Contact; in ipsec-m2ms mode from our protected
        client port, so the request rides the SA server port-c → client port-s."""
        ep = self.ep_c if self.ep_c is not None else self.endpoint
        assert ep is not None
        return Hop(ep, uri_address(binding.contact.uri))

    async def _forward(self, tx: ServerTransaction, hop: Hop) -> None:
        req = tx.request
        fwd = req.copy()
        mf = req.max_forwards
        if mf is not None:
            if mf <= 0:
                tx.reply(483)
                return
            fwd.set("Max-Forwards", mf - 1)
        if req.method in DIALOG_CREATING and not (req.to and req.to.tag):
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
            ctx.on_2xx_retransmission = partial(self._relay_2xx, hop.endpoint, hop.addr)
            task = asyncio.ensure_future(self._relay_cancel(tx, hop.endpoint, ctx))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            resp = await ctx.final()
            if req.method == "INVITE" and 200 <= resp.status < 300 and not (
                    req.to and req.to.tag):
                self._session_established(req)
        except TransactionTimeout:
            tx.reply(408 if req.method != "INVITE" else 504)
            return
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

    def _on_ack(self, req: Request, addr: Addr) -> None:
        """ACK for a 2xx: its own transaction-less request, routed like any in-dialog one."""
        if addr[0] not in self.trusted and self.registrar.aor_at(addr) is None:
            self.counters["dropped-unregistered"] += 1
            return
        self._strip_own_route(req)
        uri = req.uri
        binding = self._binding_for_contact(uri) if isinstance(uri, SipUri) else None
        if binding is None:
            return
        hop = self._hop_to(binding)
        hop.endpoint.send_stateless(req.copy(), hop.addr)
        self.counters["fwd-ACK"] += 1

    def _relay_2xx(self, ep: SipEndpoint, addr: Addr, resp: Response) -> None:
        self.counters["fwd-2xx-retransmission"] += 1
        self._on_stray_response(ep, resp, addr)

    def _on_stray_response(self, ep: SipEndpoint, resp: Response, addr: Addr) -> None:
        """A 2xx retransmission after our client transaction ended: pass it upstream, from
        the endpoint the upstream side talks to (the protected server port if there is one)."""
        if len(resp.vias) < 2:
            return
        up = self._upstream(resp)
        nxt = up.vias[0]
        host = nxt.received or nxt.sent_by[0]
        port = nxt.rport or nxt.sent_by[1]
        out = self.ep_s if self.ep_s is not None and host not in self.trusted else self.endpoint
        if out is not None:
            out.send_response(up, (host, port))

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
            pend = self.secreg.verify(tx)
            if pend is None:
                return
            try:
                moving = self._link_switch_sessions(req)
            except ValueError as exc:
                self.events.emit("register-refused", status=400, reason=str(exc),
                                 source=list(key))
                tx.reply(400, "Bad link-switch body")
                self.secreg.discard_pending(pend)
                return
            after = (lambda: self._link_switch(req, key, moving)) if moving else None
            if self._bind(tx, after) == 200:
                for old_key, old in self.secreg.promote(key, pend, time.time_ns()):
                    self.registrar.remove_source(old_key)
                    self.secreg.remove(old, "re-registration")
            else:
                self.secreg.discard_pending(pend)
            return
        if key in self.secreg.assocs:  # refresh or deregistration over the channel
            self._bind(tx)
            if not self._bound_from(key):
                self.secreg.drop_assoc(key, "deregistered", after_answer=True)
            return
        self._drop(tx, "unregistered source")

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
    parser.add_argument("--listen", required=True, help="IPv4 address to listen on")
    parser.add_argument("--port", type=int, default=5060)
    parser.add_argument("--notify", action="store_true",
                        help="the SMS and presence run: tell them about registrations and "
                        "calls (over static SAs keyed from --trust in ipsec-m2ms mode)")
    args = parser.parse_args(argv)
    start_logging(args)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
