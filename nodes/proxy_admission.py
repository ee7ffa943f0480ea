"""What the proxy lets in (DESIGN §1 Fig 1, §2 "Routes and trust"), and the record of what
it keeps out.

* A datagram from a source with no registration is **dropped unread** (counted, logged, no
  response) — unless it is a REGISTER or comes from a configured server (SMS, presence).
  Responses are taken only from the servers and from registered terminals (in ipsec-m2ms
  mode on the protected client port, the one the proxy sends requests to terminals from).
* A new request (or an ACK) from a terminal must come from a registered source, in
  ipsec-m2ms mode on the protected server port, over the terminal's SAs (Fig 1); its From
  must be the AOR registered at that source (`403` otherwise; an ACK is dropped).

Every drop and every refusal is counted and is one event; a drop is one log line too, at
most `DropBook.BURST` a second per address.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodes.events import EventLog
from nodes.registrar import Registrar
from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Message, Request
from nodes.sip.transaction import ServerTransaction
from nodes.sip.transport import Addr
from nodes.sip.uri import SipUri

log = logging.getLogger("proxy")

UNREGISTERED = "unregistered source"


@dataclass
class Endpoints:
    """The proxy's SIP endpoints, opened by `Proxy.start` and emptied by `Proxy.close`:
    5060, and in ipsec-m2ms mode the protected pair the terminals' registration SAs end at
    (Fig 1). Which of them a datagram reached decides what it may be."""

    main: SipEndpoint | None = None
    s: SipEndpoint | None = None  # protected server port (terminals' requests)
    c: SipEndpoint | None = None  # protected client port (requests to terminals)


def header_or_none(msg: Message, read: Callable[[Message], Any]) -> Any:
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


class Admission:
    """The gate in front of the SIP layer, the checks on a terminal's request before it is
    routed, and the one place drops and refusals are counted, logged and recorded."""

    def __init__(self, registrar: Registrar, trusted: set[str], endpoints: Endpoints,
                 protected: bool, counters: Counter[str], events: EventLog) -> None:
        self.registrar = registrar
        self.trusted = trusted  # the servers' addresses: exempt from the terminals' rules
        self.endpoints = endpoints
        self.protected = protected  # ipsec-m2ms mode: terminals only over their SAs
        self.counters, self.events = counters, events
        self.drops = DropBook()

    def gate(self, ep: SipEndpoint, data: bytes, source: Addr) -> bool:
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
            self.note_drop(source, what, why)
        return False

    def _answers_from(self, ep: SipEndpoint, source: Addr) -> bool:
        """Whether a terminal at `source` may send responses to `ep`: the proxy sends it
        requests at its registered contact (in ipsec-m2ms mode from the protected client
        port only; in open mode terminals use one address for everything)."""
        if self.registrar.binding_for_contact(*source) is not None:
            return not self.protected or ep is self.endpoints.c
        return not self.protected and self.registrar.aor_at(source) is not None

    def admit(self, ep: SipEndpoint, req: Request, source: Addr) -> bool:
        """Which new requests the endpoint may handle at all: REGISTER from anywhere;
        anything else only from a registered source (on the protected port in ipsec-m2ms
        mode) or a configured server. The rest — CANCEL included, which the endpoint would
        otherwise answer itself — is dropped without a word."""
        self.counters[f"rx-{req.method}"] += 1
        if req.method == "REGISTER" or source[0] in self.trusted:
            return True
        why = self._unadmitted(ep, source)
        if why is None:
            return True
        self.count_drop(req, source, why)
        return False

    def ack_problem(self, ep: SipEndpoint, req: Request, source: Addr) -> str | None:
        """Why a terminal's ACK (it has no transaction to be admitted by) may not go on, or
        None: the same rules as for its other requests."""
        return self._unadmitted(ep, source) or self.sender_problem(req, source)

    def _unadmitted(self, ep: SipEndpoint, source: Addr) -> str | None:
        """Why a request from a terminal (not a server) may not come in on `ep`, or None."""
        if self.registrar.aor_at(source) is None:
            return UNREGISTERED
        if self.protected and ep is not self.endpoints.s:
            return "not on the protected port"
        return None

    def sender_problem(self, req: Request, source: Addr) -> str | None:
        """Why a request from a (registered) terminal is not its own, or None."""
        frm = req.from_
        if frm is None or not isinstance(frm.uri, SipUri) or \
                frm.uri.aor() != self.registrar.aor_at(source):
            return "From is not the registered user"
        return None

    # -- the record of drops and refusals ---------------------------------------------------
    def drop(self, tx: ServerTransaction, why: str) -> None:
        self.count_drop(tx.request, tx.source, why)
        tx.discard()

    def count_drop(self, req: Request, source: Addr, why: str) -> None:
        self.counters["dropped-unregistered" if why == UNREGISTERED
                      else "dropped-unprotected"] += 1
        self.note_drop(source, req.method, why, header_or_none(req, lambda m: m.call_id))

    def note_drop(self, source: Addr, what: str, why: str,
                  call_id: str | None = None) -> None:
        """One log line and event for a drop, unless this address had its share already."""
        unlogged = self.drops.may_log(source[0])
        if unlogged is None:
            return
        more = f" ({unlogged} more from {source[0]} unlogged)" if unlogged else ""
        log.info("dropped %s from %s:%d: %s%s", what, *source, why, more)
        self.events.emit("dropped", why=why, method=what, call_id=call_id,
                         source=list(source), unlogged=unlogged or None)

    def refuse(self, tx: ServerTransaction, status: int, reason: str, counter: str,
               why: str, **details: Any) -> None:
        self.counters[counter] += 1
        req = tx.request
        self.events.emit("refused", status=status, why=why, method=req.method,
                         call_id=header_or_none(req, lambda m: m.call_id),
                         source=list(tx.source), **details)
        log.info("refused %s from %s:%d with %d: %s", req.method, *tx.source, status, why)
        tx.reply(status, reason)
