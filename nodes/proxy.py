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

This module wires the node together and runs it; each step is a module of its own, in the
order a request meets them: `proxy_admission` (the gate, the checks on a terminal's
request, and the record of drops and refusals), `proxy_register` (REGISTER: Fig 1's
completion, Fig 4's link-switch REGISTER, bindings, telling the SMS and presence),
`proxy_routing` (the next hop), `proxy_forward` (stateful forwarding, ACK and 2xx relays)
and `proxy_dialogs` (the dialogs proxied here).

`--mode open` runs without sec-agree (for SIPp interop and the benchmark) through the same
code path; the mode is printed at start and in every status reply.

    python -m nodes.proxy --config config/lab.json --listen 10.0.0.10 --mode open \\
        --events run/events/proxy.jsonl --control run/ctl/proxy.sock
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Coroutine
from functools import partial
from typing import Any

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
from nodes.proxy_admission import Admission, Endpoints
from nodes.proxy_dialogs import Dialogs
from nodes.proxy_forward import Forwarder
from nodes.proxy_register import Notices, Registration
from nodes.proxy_routing import Router
from nodes.registrar import Binding, Registrar
from nodes.secreg import SEC_AGREE, SERVER_PORT_C, SERVER_PORT_S, SecRegServer
from nodes.sip.checks import Policy
from nodes.sip.endpoint import SipEndpoint
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ServerTransaction
from nodes.sip.transport import UdpTransport
from nodes.trust import load_key, static_sas

PROXY_POLICY = Policy(role="proxy", supported=frozenset({SEC_AGREE}))


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
        self.listen, self.port, self.mode = listen, port, mode
        self.events = events or EventLog("proxy")
        self.timers = timers or TimerConfig()
        self.counters: Counter[str] = Counter()
        self.registrar = Registrar(lambda aor: config.terminal_of(aor) is not None)
        self.trusted = set(config.servers.values()) - {listen}
        self.endpoints = Endpoints()  # opened by start()
        self.link_moved: dict[str, Binding] = {}  # AOR -> binding it moved to (Fig 4)
        self.dialogs = Dialogs()
        self._tasks: set[asyncio.Future[None]] = set()
        protected = mode == "ipsec-m2ms"
        self.secreg: SecRegServer | None = None  # Fig 1's server side, in ipsec-m2ms mode
        if protected:
            assert creds is not None and ipsec is not None
            self.secreg = SecRegServer(ipsec, config, creds, listen, self.events,
                                       pending_timeout=self.timers.f + 1.0,
                                       port_s=protected_ports[0], port_c=protected_ports[1])
        # Terminals' requests come in on port-s in ipsec-m2ms mode: our Record-Route names it.
        rr_port = protected_ports[0] if protected else port
        our_ports = frozenset({port, *protected_ports} if protected else {port})
        self.admission = Admission(self.registrar, self.trusted, self.endpoints, protected,
                                   self.counters, self.events)
        self.notices = Notices(config, listen, self.endpoints, self.events, notify,
                               self._spawn)
        self.registration = Registration(config, self.registrar, self.secreg, self.endpoints,
                                         self.admission, self.notices, self.link_moved,
                                         self.counters, self.events)
        self.router = Router(config, listen, our_ports, self.registrar, self.dialogs,
                             self.link_moved, self.endpoints, self.admission)
        self.forwarder = Forwarder(self.admission, self.router, self.dialogs, self.notices,
                                   f"<sip:{listen}:{rr_port};lr>", self.counters,
                                   self.events, self._spawn)

    # -- life cycle -------------------------------------------------------------------------
    async def _endpoint(self, port: int, name: str) -> SipEndpoint:
        transport = await UdpTransport.create(self.listen, port)
        ep = SipEndpoint(transport, self._handle, timers=self.timers, policy=PROXY_POLICY,
                         auto_trying=False, answer_cancel=False, name=name)
        ep.ack_handler = partial(self.forwarder.on_ack, ep)
        ep.admit = partial(self.admission.admit, ep)
        ep.stray_response_handler = self.forwarder.on_stray_response
        transport.gate = partial(self.admission.gate, ep)
        return ep

    async def start(self) -> None:
        eps = self.endpoints
        eps.main = await self._endpoint(self.port, "proxy")
        if self.secreg is not None:
            assert self.ipsec is not None
            port_s, port_c = self.protected_ports
            eps.s = await self._endpoint(port_s, "proxy-s")
            eps.c = await self._endpoint(port_c, "proxy-c")
            if self.trust_key is not None:
                for server in ("sms", "presence"):
                    sas, policies = static_sas(self.trust_key, self.listen,
                                               self.config.servers[server])
                    self.ipsec.install(sas, policies)
                    self.events.emit("static-sas", peer=server, spis=[sa.spi for sa in sas])
        self.events.emit("proxy-started", mode=self.mode, listen=f"{self.listen}:{self.port}",
                         ipsec=self.ipsec.backend_name if self.ipsec else None)

    async def close(self) -> None:
        if self.secreg is not None:
            self.secreg.close()
        eps = self.endpoints
        for ep in (eps.main, eps.s, eps.c):
            if ep is not None:
                await ep.close()
        eps.main = eps.s = eps.c = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs `coro` as a task, held here until it ends (a notice, a CANCEL relay)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ---------------------------------------------------------------------------
    def _handle(self, tx: ServerTransaction) -> Awaitable[None] | None:
        """Answers REGISTERs and refusals in place; a request to forward comes back as the
        coroutine that forwards it (the endpoint runs it as a task)."""
        req = tx.request
        if req.method == "REGISTER":
            self.registration.register(tx)
            return None
        trusted = tx.source[0] in self.trusted
        if not trusted:  # admitted: registered at this source
            why = self.admission.sender_problem(req, tx.source)
            if why is not None:
                self.admission.refuse(tx, 403, "From does not match the registered user",
                                      "forbidden-from", why)
                return None
        if req.method == "INVITE":
            tx.reply(100)
        hop = self.router.route(tx, trusted)
        if hop is None:
            return None
        return self.forwarder.forward(tx, hop)

    def purge(self) -> None:
        """Expired bindings go; so do the channels (SAs) no binding uses any more."""
        self.registration.purge()

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
