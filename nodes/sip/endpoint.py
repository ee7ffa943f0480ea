"""The transaction layer: a SipEndpoint owns a transport, matches messages to
transactions (RFC 3261 §17.1.3/§17.2.3, RFC 2543 fallback), answers malformed or
unsupported requests, stamps received/rport (RFC 3581) and hands new requests to an
async handler. UAs, a registrar and a stateful proxy are built on it.

An endpoint may take requests only from some sources (`request_filter`): a terminal's
port 5060 in ipsec-m2ms mode takes none at all, its protected ports only the proxy's.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from nodes.sip.checks import Policy, SipError, check_response, validate_request
from nodes.sip.headers import MAGIC_COOKIE, Via
from nodes.sip.message import (
    Request,
    Response,
    SipParseError,
    error_response,
    parse_message,
    response_to,
)
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ClientTransaction, ServerTransaction, Transaction
from nodes.sip.transport import Addr

log = logging.getLogger(__name__)
# A handler answers at once and returns None, or returns an awaitable the endpoint runs as a
# task (an `async def` handler does the latter). A registrar answering REGISTER in place
# saves a task per request.
Handler = Callable[[ServerTransaction], Awaitable[None] | None]
AckHandler = Callable[[Request, Addr], Any]
StrayHandler = Callable[[Response, Addr], Any]
# Told about each request a request filter dropped: its method (None: it did not parse).
DropHandler = Callable[[str | None, Addr], Any]


class _RandomOctets:
    """Cryptographically random octets (RFC 3261 §19.3 asks tags to be), fetched from the
    kernel 4 KiB at a time: a registrar makes a To-tag per REGISTER, and a getrandom()
    call for each was a visible part of its cost."""

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def hex(self, n: int) -> str:
        if self._pos + n > len(self._pool):
            self._pool, self._pos = secrets.token_bytes(4096), 0
        start, self._pos = self._pos, self._pos + n
        return self._pool[start:self._pos].hex()


_random = _RandomOctets()


def new_branch() -> str:
    return MAGIC_COOKIE + _random.hex(8)


def new_tag() -> str:
    return _random.hex(6)


@functools.lru_cache(maxsize=1024)  # bounded: hosts come from the network
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def server_key(req: Request) -> tuple:
    """§17.2.3 server transaction key; RFC 2543 fallback without the magic cookie."""
    via = req.vias[0]
    method = "INVITE" if req.method == "ACK" else req.method
    branch = via.branch
    if branch and branch.startswith(MAGIC_COOKIE):
        return (branch, via.sent_by, method)
    frm = req.from_
    cseq = req.cseq
    return ("2543:" + (req.call_id or ""), str(req.uri), frm.tag if frm else None,
            cseq.number if cseq else None, str(via), method)


def response_address(via: Via, source: Addr) -> Addr:
    """Where a response to a request with this top Via goes (§18.2.2, RFC 3581)."""
    host = via.received or via.sent_by[0]
    if not _is_ip(host):
        host = source[0]  # no resolver in the lab: answer where it came from
    port = via.rport or (source[1] if "rport" in via.params else via.sent_by[1])
    return host, port


class SipEndpoint:
    """Transaction user entry point over one transport."""

    def __init__(self, transport: Any, handler: Handler | None = None, *,
                 timers: TimerConfig | None = None, policy: Policy | None = None,
                 auto_trying: bool = True, answer_cancel: bool = True,
                 advertised: Addr | None = None, name: str = "sip") -> None:
        self.transport = transport
        self.handler = handler
        self.timers = timers or TimerConfig()
        self.policy = policy or Policy()
        self.auto_trying = auto_trying
        self.answer_cancel = answer_cancel  # send 487 to a cancelled INVITE ourselves
        self.advertised = advertised or transport.local_addr
        self.name = name
        self.ack_handler: AckHandler | None = None
        self.stray_response_handler: StrayHandler | None = None
        # Consulted for each new request (not ACK) before anything is answered: False drops
        # it silently, retransmissions included (a proxy's rule for unknown sources).
        self.admit: Callable[[Request, Addr], bool] | None = None
        # Consulted with the source of every request (ACK included) and of every datagram
        # that does not parse, before anything else: False drops it without a word and
        # tells `on_filtered` (a UA's rule: requests only from where they may come).
        # Responses are not filtered: they only ever match our own client transactions.
        self.request_filter: Callable[[Addr], bool] | None = None
        self.on_filtered: DropHandler | None = None
        self._clients: dict[tuple, ClientTransaction] = {}
        self._servers: dict[tuple, ServerTransaction] = {}
        self._accepted_invites: dict[tuple, ServerTransaction] = {}
        # Completed non-INVITE server transactions (§17.2.2), kept as what the state needs
        # and nothing more: key -> (response octets or None, where to, Timer J deadline).
        # A busy registrar holds one per REGISTER for 64*T1; full objects with a timer
        # each made the garbage collector its largest cost.
        self._completed: dict[tuple, tuple[bytes | None, Addr, float]] = {}
        self._completed_order: deque[tuple[float, tuple]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        transport.set_receiver(self._on_datagram)

    # ------------------------------------------------------------ sending
    @property
    def local_addr(self) -> Addr:
        return self.transport.local_addr

    def _send(self, msg: Request | Response, addr: Addr) -> None:
        self.transport.send(msg.serialize(), addr)

    def make_via(self, branch: str | None = None) -> Via:
        host, port = self.advertised
        via = Via(host, port).with_param("branch", branch or new_branch())
        return via.with_param("rport", None)

    def client_transaction(self, req: Request, addr: Addr, *,
                           on_provisional: Callable[[Response], None] | None = None,
                           add_via: bool = True) -> ClientTransaction:
        """Starts a client transaction; await tx.final() for the final response."""
        if req.method == "ACK":
            raise ValueError("ACK is not sent in a transaction; use send_stateless()")
        if add_via:
            req.add("Via", self.make_via(), top=True)
        if not req.has("max-forwards"):
            req.add("Max-Forwards", 70)
        via = req.vias[0]
        assert req.cseq is not None
        key = (via.branch, req.cseq.method)
        tx = ClientTransaction(self, req, addr, key, self.timers, on_provisional)
        self._clients[key] = tx
        tx.start()
        return tx

    async def request(self, req: Request, addr: Addr, *,
                      on_provisional: Callable[[Response], None] | None = None) -> Response:
        """Sends a request and returns its final response (raises TransactionTimeout)."""
        tx = self.client_transaction(req, addr, on_provisional=on_provisional)
        return await tx.final()

    def send_stateless(self, req: Request, addr: Addr, *, add_via: bool = True) -> None:
        """Sends a request outside any transaction (ACK for a 2xx)."""
        if add_via:
            req.add("Via", self.make_via(), top=True)
        if not req.has("max-forwards"):
            req.add("Max-Forwards", 70)
        self._send(req, addr)

    def cancel(self, invite_tx: ClientTransaction) -> ClientTransaction:
        """§9.1 CANCEL for a pending INVITE (same Via branch, its own transaction)."""
        inv = invite_tx.request
        fields = [h for h in inv.headers if h.key in ("from", "to", "call-id", "route")]
        req = Request("CANCEL", inv.uri, [("Via", inv.values("via")[0]), *fields])
        assert inv.cseq is not None
        req.add("CSeq", f"{inv.cseq.number} CANCEL")
        req.add("Max-Forwards", 70)
        return self.client_transaction(req, invite_tx.addr, add_via=False)

    def send_response(self, resp: Response, addr: Addr) -> None:
        """Stateless response send (a proxy forwarding a stray 2xx, ...)."""
        self._send(resp, addr)

    # ------------------------------------------------------------ receiving
    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if not data.strip(b"\r\n"):
            return  # RFC 5626 keep-alive
        try:
            msg = parse_message(data)
        except SipParseError as e:
            if not self._request_allowed(None, addr):
                return
            resp = error_response(e)
            log.info("%s: unparseable message from %s:%d: %s", self.name, *addr, e)
            if resp is not None:
                self._safe_send(resp, addr)
            return
        try:
            if isinstance(msg, Request):
                self._on_request(msg, addr)
            else:
                self._on_response(msg, addr)
        except Exception:  # one bad message must not stop the endpoint
            log.exception("%s: error handling message from %s:%d", self.name, *addr)

    def _safe_send(self, msg: Request | Response, addr: Addr) -> None:
        self._safe_send_octets(msg.serialize(), addr)

    def _safe_send_octets(self, data: bytes, addr: Addr) -> None:
        try:
            self.transport.send(data, addr)
        except (OSError, ValueError) as e:
            log.warning("%s: send to %s:%d failed: %s", self.name, *addr, e)

    def _request_allowed(self, method: str | None, addr: Addr) -> bool:
        if self.request_filter is None or self.request_filter(addr):
            return True
        if self.on_filtered is not None:
            self.on_filtered(method, addr)
        return False

    def _stamp_via(self, req: Request, addr: Addr) -> Via:
        """§18.2.1 and RFC 3581: `received` and `rport` say where the request really came
        from. Only this server writes them: values a client put there itself are replaced
        (or, for a `received` equal to a sent-by that is the source, dropped)."""
        via = req.vias[0]
        new = via
        if via.sent_by[0] != addr[0]:
            if via.received != addr[0]:
                new = new.with_param("received", addr[0])
        elif "received" in via.params:
            new = new.with_param("received", None)
            new.params.remove("received")
        if "rport" in via.params and via.params.get("rport") != str(addr[1]):
            new = new.with_param("rport", str(addr[1]))
        if new is not via:
            req.replace_top("via", new)
        return new

    def _on_request(self, req: Request, addr: Addr) -> None:
        if not self._request_allowed(req.method, addr):
            return
        try:
            vias = req.vias
        except ValueError:
            vias = []
        if not vias:
            if req.method != "ACK":
                self._refuse_stateless(req, addr, SipError(400, "Malformed or missing Via"))
            return
        via = self._stamp_via(req, addr)
        resp_addr = response_address(via, addr)
        try:
            key = server_key(req)
        except ValueError as e:
            if req.method != "ACK":
                self._refuse_stateless(req, resp_addr, SipError(400, f"Malformed header: {e}"))
            return
        tx = self._servers.get(key)
        if req.method == "ACK":
            self._on_ack(req, addr, tx)
            return
        if tx is not None:
            tx.receive_retransmission()
            return
        done = self._completed.get(key)
        if done is not None:  # retransmission of a completed non-INVITE request
            if done[0] is not None:
                self._safe_send_octets(done[0], done[1])
            return
        if self.admit is not None and not self.admit(req, addr):
            self._new_server(req, addr, key, resp_addr).discard()
            return
        try:
            validate_request(req, self.policy)
        except SipError as e:
            log.info("%s: %s from %s:%d refused: %d %s", self.name, req.method, *addr,
                     e.status, e.reason)
            tx = self._new_server(req, addr, key, resp_addr)
            tx.reply(e.status, e.reason, headers=e.headers)
            return
        tx = self._new_server(req, addr, key, resp_addr)
        if req.method == "CANCEL":
            self._on_cancel(tx)
            return
        if req.method == "INVITE" and self.auto_trying:
            tx.respond(response_to(req, 100))
        if self.handler is None:
            tx.reply(501 if req.method != "INVITE" else 480)
            return
        try:
            pending = self.handler(tx)
        except Exception:
            self._handler_failed(tx)
            return
        if pending is not None:
            self._spawn(self._run_handler(tx, pending))

    def _new_server(self, req: Request, addr: Addr, key: tuple,
                    resp_addr: Addr) -> ServerTransaction:
        tx = ServerTransaction(self, req, addr, key, self.timers, resp_addr)
        to = req.to
        if to is not None and to.tag is None:
            tx.local_tag = new_tag()
        self._servers[key] = tx
        return tx

    def _refuse_stateless(self, req: Request, addr: Addr, err: SipError) -> None:
        log.info("%s: %s from %s:%d refused: %d %s", self.name, req.method, *addr, err.status,
                 err.reason)
        self._safe_send(response_to(req, err.status, err.reason, headers=err.headers), addr)

    def _on_ack(self, req: Request, addr: Addr, tx: ServerTransaction | None) -> None:
        if tx is not None and tx.invite and tx.last_response is not None \
                and tx.last_response.status >= 300:
            tx.receive_ack()
            return
        cseq = req.cseq
        if cseq is not None:
            inv = self._accepted_invites.get((req.call_id, cseq.number))
            if inv is not None:
                inv.ack_received()
        if self.ack_handler is not None:
            result = self.ack_handler(req, addr)
            if asyncio.iscoroutine(result):
                self._spawn(result)

    def _on_cancel(self, tx: ServerTransaction) -> None:
        req = tx.request
        inv_key = tx.key[:-1] + ("INVITE",)
        inv = self._servers.get(inv_key)
        if inv is None:
            tx.reply(481)
            return
        tx.reply(200)
        if not inv.final_sent:
            inv.cancelled.set()
            if self.answer_cancel:
                inv.reply(487)
        log.debug("%s: CANCEL for %s", self.name, req.call_id)

    async def _run_handler(self, tx: ServerTransaction, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception:
            self._handler_failed(tx)

    def _handler_failed(self, tx: ServerTransaction) -> None:
        log.exception("%s: handler failed for %s", self.name, tx.request.method)
        if not tx.final_sent:
            tx.reply(500)

    def spawn(self, coro: Any) -> None:
        """Runs `coro` as a task that ends (cancelled, if need be) with this endpoint."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    _spawn = spawn

    def _on_response(self, resp: Response, addr: Addr) -> None:
        if not check_response(resp, self.policy.role):
            log.info("%s: dropping malformed response from %s:%d", self.name, *addr)
            return
        via = resp.vias[0]
        assert resp.cseq is not None
        tx = self._clients.get((via.branch, resp.cseq.method))
        if tx is not None:
            tx.receive(resp)
        elif self.stray_response_handler is not None:
            result = self.stray_response_handler(resp, addr)
            if asyncio.iscoroutine(result):
                self._spawn(result)

    # ------------------------------------------------------------ bookkeeping
    def _accepted(self, tx: ServerTransaction) -> None:
        cseq = tx.request.cseq
        if cseq is not None:
            tx.accepted_key = (tx.request.call_id, cseq.number)
            self._accepted_invites[tx.accepted_key] = tx

    def _forget(self, tx: Transaction) -> None:
        if isinstance(tx, ClientTransaction):
            if self._clients.get(tx.key) is tx:
                del self._clients[tx.key]
        else:
            if self._servers.get(tx.key) is tx:
                del self._servers[tx.key]
            # By the key it was indexed under: a malformed request's headers may not parse.
            k = getattr(tx, "accepted_key", None)
            if k is not None and self._accepted_invites.get(k) is tx:
                del self._accepted_invites[k]

    def _park(self, key: tuple, response: bytes | None, addr: Addr, timer_j: float) -> None:
        """Keeps a completed non-INVITE server transaction as its final response octets
        (None: a request dropped unanswered) until Timer J: retransmissions of the request
        get the response again, or nothing, and never reach the handler."""
        loop = self._loop
        deadline = loop.time() + timer_j
        self._completed[key] = (response, addr, deadline)
        self._completed_order.append((deadline, key))
        if self._sweep is None:
            self._sweep = loop.call_at(deadline, self._timer_j_sweep)

    def _timer_j_sweep(self) -> None:
        """Timer J for every parked transaction: one timer for all, deadlines in order."""
        loop = self._loop
        now = loop.time()
        order, completed = self._completed_order, self._completed
        while order and order[0][0] <= now:
            deadline, key = order.popleft()
            entry = completed.get(key)
            if entry is not None and entry[2] <= now:  # not parked again since
                del completed[key]
        self._sweep = loop.call_at(order[0][0], self._timer_j_sweep) if order else None

    @property
    def transaction_count(self) -> int:
        return len(self._clients) + len(self._servers) + len(self._completed)

    async def close(self) -> None:
        """Stops all timers and handler tasks and closes the transport."""
        for tx in [*self._clients.values(), *self._servers.values()]:
            for t in tx.timers.values():
                t.cancel()
        self._clients.clear()
        self._servers.clear()
        self._accepted_invites.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._completed.clear()
        self._completed_order.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.transport.close()
