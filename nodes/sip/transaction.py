"""RFC 3261 §17 transactions over UDP (with the RFC 6026 Accepted states).

Client INVITE: timers A (retransmit), B (timeout), D (absorb final retransmits), M.
Client non-INVITE: E (retransmit), F (timeout), K. Server INVITE: G (final retransmit),
H (wait for ACK), I (absorb ACKs), L (accepted). Server non-INVITE: J (kept by the endpoint,
see ``SipEndpoint._park``).
The owner (``SipEndpoint``) sends octets and keeps the matching tables.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from enum import Enum
from typing import TYPE_CHECKING, Any

from nodes.sip.message import HeaderField, HeaderInput, Request, Response, response_to
from nodes.sip.timers import Timer, TimerConfig

if TYPE_CHECKING:
    from nodes.sip.transport import Addr

log = logging.getLogger(__name__)


class TransactionTimeout(Exception):
    """No final response before Timer B (INVITE) or Timer F (non-INVITE)."""


class TransactionTransportError(Exception):
    """The transport refused to send the request."""


class ClientInviteState(Enum):
    CALLING = "Calling"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class ClientState(Enum):
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"


class ServerInviteState(Enum):
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class ServerState(Enum):
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"


class Transaction:
    """State, timers and the send path common to all four machines."""

    kind = "transaction"

    def __init__(self, owner: Any, request: Request, addr: Addr, key: tuple,
                 timers: TimerConfig, state: Enum) -> None:
        self.owner = owner
        self.request = request
        self.addr = addr
        self.key = key
        self.cfg = timers
        self.state: Any = state
        self.timers: dict[str, Timer] = {}
        # Events are made on first use: most transactions are never awaited, and a proxy
        # keeps thousands alive for 64*T1 (fewer objects for the garbage collector).
        self._terminated: asyncio.Event | None = None
        log.debug("%s %s: created in %s", self.kind, self.key[0], state.value)

    @property
    def terminated(self) -> asyncio.Event:
        if self._terminated is None:
            self._terminated = asyncio.Event()
            if self.state.name == "TERMINATED":
                self._terminated.set()
        return self._terminated

    def _timer(self, name: str) -> Timer:
        t = self.timers.get(name)
        if t is None:
            t = self.timers[name] = Timer(name, self._expired)
        return t

    def _start(self, name: str, interval: float) -> None:
        self._timer(name).start(interval)

    def _cancel(self, *names: str) -> None:
        for n in names:
            t = self.timers.get(n)
            if t is not None:
                t.cancel()

    def _set_state(self, new: Enum) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        log.debug("%s %s: %s -> %s", self.kind, self.key[0], old.value, new.value)
        if new.name == "TERMINATED":
            for t in self.timers.values():
                t.cancel()
            # Each Timer holds a bound method of this transaction: dropping them breaks the
            # cycle, so a finished transaction is freed at once, not by a full GC pass.
            self.timers.clear()
            self.owner._forget(self)
            if self._terminated is not None:
                self._terminated.set()

    def _send(self, msg: Request | Response, addr: Addr | None = None) -> bool:
        try:
            self.owner._send(msg, addr or self.addr)
            return True
        except (OSError, ValueError) as e:
            log.warning("%s %s: send failed: %s", self.kind, self.key[0], e)
            return False

    def _expired(self, timer: Timer) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- client side
class ClientTransaction(Transaction):
    """Sends one request and resolves final() with the final response."""

    def __init__(self, owner: Any, request: Request, addr: Addr, key: tuple,
                 timers: TimerConfig,
                 on_provisional: Callable[[Response], None] | None = None) -> None:
        invite = request.method == "INVITE"
        super().__init__(owner, request, addr, key, timers,
                         ClientInviteState.CALLING if invite else ClientState.TRYING)
        self.kind = "client-INVITE" if invite else f"client-{request.method}"
        self.invite = invite
        self.on_provisional = on_provisional
        # Called with 2xx retransmissions seen in Accepted (the UA re-sends its ACK).
        self.on_2xx_retransmission: Callable[[Response], None] | None = None
        self._final: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.last_response: Response | None = None
        self._ack: Request | None = None

    def start(self) -> None:
        if not self._send(self.request):
            self._fail(TransactionTransportError(f"cannot send {self.request.method}"))
            return
        if self.invite:
            self._start("A", self.cfg.t1)
            self._start("B", self.cfg.b)
        else:
            self._start("E", self.cfg.t1)
            self._start("F", self.cfg.f)

    async def final(self) -> Response:
        return await asyncio.shield(self._final)

    @property
    def done(self) -> bool:
        return self._final.done()

    def _fail(self, exc: Exception) -> None:
        if not self._final.done():
            self._final.set_exception(exc)
            self._final.exception()  # mark retrieved: a caller may never await it
        self._set_state(ClientInviteState.TERMINATED if self.invite else ClientState.TERMINATED)

    def _resolve(self, resp: Response) -> None:
        if not self._final.done():
            self._final.set_result(resp)

    def receive(self, resp: Response) -> None:
        self.last_response = resp
        if self.invite:
            self._receive_invite(resp)
        else:
            self._receive_non_invite(resp)

    def _receive_invite(self, resp: Response) -> None:
        st = self.state
        if st in (ClientInviteState.CALLING, ClientInviteState.PROCEEDING):
            if resp.status < 200:
                self._cancel("A", "B")
                self._set_state(ClientInviteState.PROCEEDING)
                if self.on_provisional:
                    self.on_provisional(resp)
            elif resp.status < 300:
                self._cancel("A", "B")
                self._set_state(ClientInviteState.ACCEPTED)
                self._start("M", self.cfg.m)
                self._resolve(resp)
            else:
                self._cancel("A", "B")
                self._send_ack(resp)
                self._set_state(ClientInviteState.COMPLETED)
                self._start("D", self.cfg.d)
                self._resolve(resp)
        elif st is ClientInviteState.COMPLETED and resp.status >= 300 and self._ack:
            self._send(self._ack)  # final retransmitted: our ACK was lost
        elif (st is ClientInviteState.ACCEPTED and 200 <= resp.status < 300
              and self.on_2xx_retransmission):
            self.on_2xx_retransmission(resp)

    def _send_ack(self, resp: Response) -> None:
        """§17.1.1.3: ACK for a non-2xx final, within this transaction."""
        req = self.request
        top_via = req.values("via")[0]
        fields = [HeaderField("Via", top_via)]
        for h in req.headers:
            if h.key in ("from", "call-id", "route", "max-forwards"):
                fields.append(h)
        to = resp.get("to") or req.get("to") or ""
        fields.append(HeaderField("To", to))
        assert req.cseq is not None
        fields.append(HeaderField("CSeq", f"{req.cseq.number} ACK"))
        self._ack = Request("ACK", req.uri, fields)
        self._send(self._ack)

    def _receive_non_invite(self, resp: Response) -> None:
        st = self.state
        if st not in (ClientState.TRYING, ClientState.PROCEEDING):
            return  # Completed: final retransmissions absorbed
        if resp.status < 200:
            self._set_state(ClientState.PROCEEDING)
            if self.on_provisional:
                self.on_provisional(resp)
            return
        self._cancel("E", "F")
        self._set_state(ClientState.COMPLETED)
        self._start("K", self.cfg.k)
        self._resolve(resp)

    def _expired(self, timer: Timer) -> None:
        name, st = timer.name, self.state
        if name == "A" and st is ClientInviteState.CALLING:
            self._send(self.request)
            self._start("A", timer.interval * 2)
        elif name == "B" and st is ClientInviteState.CALLING:
            self._fail(TransactionTimeout(
                f"Timer B fired: no response to INVITE within {self.cfg.b:g} s"))
        elif name == "E" and st in (ClientState.TRYING, ClientState.PROCEEDING):
            self._send(self.request)
            nxt = self.cfg.t2 if st is ClientState.PROCEEDING else min(2 * timer.interval,
                                                                       self.cfg.t2)
            self._start("E", nxt)
        elif name == "F" and st in (ClientState.TRYING, ClientState.PROCEEDING):
            self._fail(TransactionTimeout(
                f"Timer F fired: no final response to {self.request.method} "
                f"within {self.cfg.f:g} s"))
        elif name in ("D", "K", "M"):
            self._set_state(ClientInviteState.TERMINATED if self.invite
                            else ClientState.TERMINATED)


# ---------------------------------------------------------------- server side
def _back_to_source(request: Request, source: Addr, response_addr: Addr) -> Addr:
    """Where responses to a request may go: to the host it came from (§18.2.2 over UDP: the
    `received` address, which is the source), and with `rport` (RFC 3581) to the port it
    came from too. A `received` or `rport` value the sender wrote into its own Via would
    otherwise aim our responses at a third party (a reflection attack)."""
    host, port = response_addr
    if host == source[0] and port == source[1]:
        return response_addr  # the common case: nothing to check
    if port != source[1]:
        try:
            asked_rport = "rport" in request.vias[0].params
        except (ValueError, IndexError):
            asked_rport = False
        if asked_rport:
            port = source[1]
    return source[0], port


class ServerTransaction(Transaction):
    """One received request; the TU answers with respond()."""

    def __init__(self, owner: Any, request: Request, addr: Addr, key: tuple,
                 timers: TimerConfig, response_addr: Addr) -> None:
        invite = request.method == "INVITE"
        super().__init__(owner, request, addr, key, timers,
                         ServerInviteState.PROCEEDING if invite else ServerState.TRYING)
        self.kind = "server-INVITE" if invite else f"server-{request.method}"
        self.invite = invite
        self.source = addr
        self.response_addr = _back_to_source(request, addr, response_addr)
        self.last_response: Response | None = None
        self._cancelled: asyncio.Event | None = None
        self._acked: asyncio.Event | None = None
        self.retransmit_2xx = True  # UAS core duty; a proxy turns it off
        self.local_tag: str | None = None
        self.accepted_key: tuple[str, int] | None = None  # set by the endpoint's index

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when a CANCEL for this INVITE arrived."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
        return self._cancelled

    @property
    def acked(self) -> asyncio.Event:
        """Set when the ACK for our 2xx arrived."""
        if self._acked is None:
            self._acked = asyncio.Event()
        return self._acked

    @property
    def final_sent(self) -> bool:
        return self.last_response is not None and self.last_response.status >= 200

    def respond(self, resp: Response) -> None:
        """Sends a response through the machine (ignored once a final was sent)."""
        st = self.state
        if self.invite:
            if st is not ServerInviteState.PROCEEDING:
                log.debug("%s %s: response %d after final ignored", self.kind, self.key[0],
                          resp.status)
                return
            self.last_response = resp
            self._send(resp, self.response_addr)
            if resp.status < 200:
                return
            if resp.status < 300:
                self._set_state(ServerInviteState.ACCEPTED)
                self._start("L", self.cfg.l)
                if self.retransmit_2xx:
                    self._start("G2xx", self.cfg.t1)
                self.owner._accepted(self)
            else:
                self._set_state(ServerInviteState.COMPLETED)
                self._start("G", self.cfg.t1)
                self._start("H", self.cfg.h)
            return
        if st not in (ServerState.TRYING, ServerState.PROCEEDING):
            return
        self.last_response = resp
        if resp.status < 200:
            self._send(resp, self.response_addr)
            self._set_state(ServerState.PROCEEDING)
            return
        data = resp.serialize()
        try:
            self.owner.transport.send(data, self.response_addr)
        except (OSError, ValueError) as e:
            log.warning("%s %s: send failed: %s", self.kind, self.key[0], e)
        self._set_state(ServerState.COMPLETED)
        self._hand_over(data)

    def _hand_over(self, response: bytes | None) -> None:
        """Completed (§17.2.2) needs only the response octets until Timer J: the owner keeps
        those and this object ends here, instead of living 64*T1 with a timer."""
        self._set_state(ServerInviteState.TERMINATED if self.invite else ServerState.TERMINATED)
        self.owner._park(self.key, response, self.response_addr, self.cfg.j)
        log.debug("%s %s: retransmissions absorbed by the endpoint for Timer J (%g s)",
                  self.kind, self.key[0], self.cfg.j)

    def discard(self) -> None:
        """Answer nothing (a proxy silently dropping a request): absorb retransmissions of it
        until Timer J (64*T1), so each is not handled anew."""
        if self.last_response is None:
            self._hand_over(None)

    def receive_retransmission(self) -> None:
        st = self.state
        if self.invite:
            if st in (ServerInviteState.PROCEEDING, ServerInviteState.COMPLETED) \
                    and self.last_response is not None:
                self._send(self.last_response, self.response_addr)
        elif st in (ServerState.PROCEEDING, ServerState.COMPLETED) and self.last_response:
            self._send(self.last_response, self.response_addr)

    def receive_ack(self) -> None:
        """ACK of a non-2xx final (same branch)."""
        if self.state is ServerInviteState.COMPLETED:
            self._cancel("G", "H")
            self._set_state(ServerInviteState.CONFIRMED)
            self._start("I", self.cfg.i)

    def ack_received(self) -> None:
        """ACK of our 2xx (its own transaction): stop retransmitting the 2xx."""
        self._cancel("G2xx")
        self.acked.set()

    def _expired(self, timer: Timer) -> None:
        name, st = timer.name, self.state
        if name == "G" and st is ServerInviteState.COMPLETED and self.last_response:
            self._send(self.last_response, self.response_addr)
            self._start("G", min(2 * timer.interval, self.cfg.t2))
        elif name == "G2xx" and st is ServerInviteState.ACCEPTED and self.last_response:
            self._send(self.last_response, self.response_addr)
            self._start("G2xx", min(2 * timer.interval, self.cfg.t2))
        elif name == "H" and st is ServerInviteState.COMPLETED:
            log.info("%s %s: Timer H fired, no ACK", self.kind, self.key[0])
            self._set_state(ServerInviteState.TERMINATED)
        elif name == "L":
            if self._acked is None or not self._acked.is_set():
                log.info("%s %s: 2xx never acknowledged", self.kind, self.key[0])
            self._set_state(ServerInviteState.TERMINATED)
        elif name == "I":
            self._set_state(ServerInviteState.TERMINATED)

    def reply(self, status: int, reason: str | None = None, *,
              headers: Iterable[HeaderInput] = (), body: bytes = b"",
              content_type: str | None = None) -> Response:
        """Builds (§8.2.6, with this transaction's To tag) and sends a response."""
        resp = response_to(self.request, status, reason, to_tag=self.local_tag,
                           headers=headers, body=body, content_type=content_type)
        self.respond(resp)
        return resp
