"""Terminal node: a SIP UA that registers, calls, answers, sends MESSAGE and hangs up.

Driven by the runner through its control socket (`nodes.control`; the commands are in
`nodes.terminal_control`); every step is a JSON line in its event log with a wall-clock
`t_ns` (DESIGN §2, Measurements).

    python -m nodes.terminal --name a1 --local 10.0.1.10 --proxy 10.0.0.10 --mode open \\
        --events run/events/a1.jsonl --control run/ctl/a1.sock

The terminal is put together from its parts, one per step of the paper:

* `nodes.terminal_register` — Fig 1: its SIP ports, the protected channel, REGISTER;
* `nodes.terminal_calls` — Fig 2: calls and their secure media;
* `nodes.smigagent` — Fig 3: the session switch between terminals;
* `nodes.linkswitch` — Fig 4: the link-interface switch.

This module holds what ties them together: the UA and its request dispatch, MESSAGE, the
status, start and shutdown (BYEs go out in parallel, bounded, and the SAs always go), and
the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
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
from nodes.mediasession import MediaSession
from nodes.secreg import ClientChannel, SecRegClient
from nodes.sip.dialog import Dialog, UserAgent
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ServerTransaction, TransactionTimeout
from nodes.sip.transport import Addr, UdpTransport
from nodes.sip.uri import SipUri, parse_uri
from nodes.smigagent import SmigAgent
from nodes.terminal_calls import TerminalCalls
from nodes.terminal_control import add_commands
from nodes.terminal_register import TerminalRegistration

# On shutdown, how long the BYEs of all calls may take together: a dead peer must not hold
# up the exit (the lab gives a node 3 s after SIGTERM before it kills it).
CLOSE_BYE_WAIT = 1.0
MAX_MESSAGE_TEXT = 1300  # bytes; RFC 3428 §6: MESSAGE over UDP without congestion control


class Terminal(TerminalRegistration, TerminalCalls):
    """A terminal of the lab: Fig 1 and Fig 2 are its mixed-in parts, Fig 3 (`smig`) and
    Fig 4 (`linkswitch`) agents it holds."""

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

    # -- commands ---------------------------------------------------------------------------
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
            "mode": self.mode, "interfaces": dict(self.interfaces),
            "active": next((n for n, ip in self.interfaces.items() if ip == self.active_ip),
                           self.active_ip),
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
        add_commands(control, term)
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
