"""What the session management server and the presence server share: a SIP endpoint that
takes SMIG MESSAGEs from the proxy and sends SMIG MESSAGEs to terminals through it, the
static SAs to the proxy (DESIGN §2, "Routes and trust"), a control socket and an event log.

A subclass implements `handle(msg, sender, tx)` and answers with `tx.reply(...)`; a request
that is not a SMIG MESSAGE from the proxy is refused, a malformed body gets 400 — the node
keeps running and nothing changes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections import Counter
from typing import Any

from nodes import smig
from nodes.cli import node_arguments, run_node, start_logging, starting
from nodes.control import ControlServer, until_stopped
from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import ConfigError, LabConfig
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.message import Request
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ServerTransaction, TransactionTimeout
from nodes.sip.transport import UdpTransport
from nodes.sip.uri import SipUri
from nodes.trust import load_key, static_sas

log = logging.getLogger("server")


class SmigServer:
    name = "server"

    def __init__(self, config: LabConfig, events: EventLog, timers: TimerConfig,
                 ipsec: NodeIpsec | None = None, trust_key: bytes | None = None) -> None:
        self.config, self.events, self.timers = config, events, timers
        self.ipsec, self.trust_key = ipsec, trust_key
        self.listen = config.servers[self.name]
        self.proxy = (config.servers["proxy"], 5060)
        self.counters: Counter[str] = Counter()
        self.endpoint: SipEndpoint | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.ipsec is not None and self.trust_key is not None:
            sas, policies = static_sas(self.trust_key, self.listen, self.proxy[0])
            self.ipsec.install(sas, policies)
            self.events.emit("static-sas", peer=self.proxy[0], spis=[sa.spi for sa in sas])
        with starting(f"listen on {self.listen}:5060"):
            transport = await UdpTransport.create(self.listen, 5060)
        self.endpoint = SipEndpoint(transport, self._on_request, timers=self.timers,
                                    name=self.name)
        self.events.emit(f"{self.name}-started", listen=f"{self.listen}:5060")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.endpoint is not None:
            await self.endpoint.close()
            self.endpoint = None

    # -- incoming -----------------------------------------------------------------------------
    async def _on_request(self, tx: ServerTransaction) -> None:
        req = tx.request
        if tx.source[0] != self.proxy[0]:
            self.counters["refused-not-proxy"] += 1
            tx.reply(403, "Only the proxy talks to this server")
            return
        if req.method != "MESSAGE":
            tx.reply(405, "Only MESSAGE", headers=[("Allow", "MESSAGE")])
            return
        ctype = req.content_type
        if ctype is None or ctype.mime != smig.CONTENT_TYPE:
            tx.reply(415, "Unsupported Media Type", headers=[("Accept", smig.CONTENT_TYPE)])
            return
        try:
            msg = smig.parse(req.body)
        except ValueError as exc:
            self.counters["bad-body"] += 1
            self.events.emit("refused", status=400, why=str(exc))
            tx.reply(400, reason_phrase(f"Bad SMIG body: {exc}"))
            return
        frm = req.from_
        sender = frm.uri.user if frm is not None and isinstance(frm.uri, SipUri) else None
        self.counters[f"rx-{msg.TYPE}"] += 1
        await self.handle(msg, sender or "", tx)

    async def handle(self, msg: smig.Smig, sender: str, tx: ServerTransaction) -> None:
        raise NotImplementedError

    # -- outgoing -----------------------------------------------------------------------------
    def send(self, terminal: str, msg: smig.Smig) -> asyncio.Task[int | None]:
        """MESSAGE to a terminal through the proxy; runs in the background, result logged."""
        task = asyncio.ensure_future(self._send(terminal, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _send(self, terminal: str, msg: smig.Smig) -> int | None:
        assert self.endpoint is not None
        domain = self.config.domain
        req = Request("MESSAGE", f"sip:{terminal}@{domain}", [
            ("From", f"<sip:{self.name}@{domain}>;tag={new_tag()}"),
            ("To", f"<sip:{terminal}@{domain}>"), ("Call-ID", f"{new_tag()}@{self.listen}"),
            ("CSeq", "1 MESSAGE"), ("Content-Type", smig.CONTENT_TYPE)], msg.serialize())
        self.counters[f"tx-{msg.TYPE}"] += 1
        try:
            resp = await self.endpoint.request(req, self.proxy)
        except TransactionTimeout:
            self.events.emit("send-failed", to=terminal, type=msg.TYPE, session=msg.session)
            return None
        if resp.status >= 300:
            self.events.emit("send-refused", to=terminal, type=msg.TYPE, status=resp.status,
                             reason=resp.reason, session=msg.session)
        return resp.status

    def status(self) -> dict[str, Any]:
        return {"counters": dict(self.counters),
                "ipsec": self.ipsec.describe() if self.ipsec else None}


def reason_phrase(text: str, limit: int = 120) -> str:
    """`text` as a SIP reason phrase: no control characters (a CR LF from a message field
    would start a header of the response), at most `limit` characters."""
    clean = "".join(" " if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."


def server_main(cls: type[SmigServer], argv: list[str] | None = None) -> int:
    """The command line shared by `nodes.sms` and `nodes.presence`."""
    parser = argparse.ArgumentParser(prog=f"python -m nodes.{cls.name}")
    node_arguments(parser, trust=True)
    args = parser.parse_args(argv)
    start_logging(args)
    try:
        config = LabConfig.load(args.config)
        key = load_key(args.trust) if args.mode == "ipsec-m2ms" else None
    except ConfigError as exc:
        print(f"{cls.name}: {exc}", file=sys.stderr)
        return 2
    return run_node(cls.name, _run(cls, args, config, key))


async def _run(cls: type[SmigServer], args: argparse.Namespace, config: LabConfig,
               key: bytes | None) -> int:
    events = EventLog(cls.name, args.events)
    ipsec = NodeIpsec.create(args.ipsec, cls.name, args.esp_sa) if key else None
    server = cls(config, events, TimerConfig(t1=args.t1, timer_d=64 * args.t1), ipsec, key)
    control = ControlServer(args.control, cls.name) if args.control else None
    try:
        await server.start()
        if control is not None:
            async def status() -> dict[str, Any]:
                return server.status()

            control.command("status", status, help="state and counters")
            await control.start()
        print(f"{cls.name}: listening on {server.listen}:5060", flush=True)
        await until_stopped()
    finally:
        if control is not None:
            await control.close()
        await server.close()
        if ipsec is not None:
            ipsec.close()
        events.emit(f"{cls.name}-stopped", counters=dict(server.counters))
        events.close()
    return 0
