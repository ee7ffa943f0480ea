"""Stateful forwarding through the proxy, and the relays that have no transaction of their
own: ACKs for 2xx, and 2xx retransmissions (RFC 6026).

* An admitted, routed request is proxied statefully, with Record-Route on dialog-creating
  requests; a 2xx to an initial INVITE makes a `ProxiedDialog` (and the SMS hears of it), a
  BYE ends one. A CANCEL of the caller's INVITE is relayed to the callee.
* A 2xx retransmission after the INVITE transaction is relayed only for a dialog proxied
  here, and only to where the caller's responses went.
* An ACK is never answered: one that may not go on is dropped with a log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from nodes.events import EventLog
from nodes.proxy_admission import Admission, header_or_none
from nodes.proxy_dialogs import Dialogs, Hop, ProxiedDialog
from nodes.proxy_register import Notices
from nodes.proxy_routing import Router
from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Request, Response
from nodes.sip.transaction import ClientTransaction, ServerTransaction, TransactionTimeout
from nodes.sip.transport import Addr
from nodes.sip.uri import SipUri

log = logging.getLogger("proxy")

DIALOG_CREATING = ("INVITE",)


def upstream(resp: Response) -> Response:
    """A response as it goes back towards the request's sender: without our Via."""
    up = resp.copy()
    up.pop_top("via")
    return up


class Forwarder:
    def __init__(self, admission: Admission, router: Router, dialogs: Dialogs,
                 notices: Notices, record_route: str, counters: Counter[str],
                 events: EventLog, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.admission, self.router, self.dialogs = admission, router, dialogs
        self.notices = notices
        self.record_route = record_route
        self.counters, self.events = counters, events
        self.spawn = spawn  # runs a coroutine in the background

    async def forward(self, tx: ServerTransaction, hop: Hop) -> None:
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
                tx.respond(upstream(resp))

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
            self.spawn(self._relay_cancel(tx, hop.endpoint, ctx))
        try:
            resp = await ctx.final()
        except TransactionTimeout:
            tx.reply(408 if req.method != "INVITE" else 504)
            return
        finally:
            if req.method == "BYE":
                self.dialogs.end(req)
        if initial_invite and 200 <= resp.status < 300:
            self._dialog_established(tx, hop, ctx, resp)
        tx.respond(upstream(resp))

    async def _relay_cancel(self, tx: ServerTransaction, ep: SipEndpoint,
                            ctx: ClientTransaction) -> None:
        cancelled = asyncio.ensure_future(tx.cancelled.wait())
        done = asyncio.ensure_future(ctx.final())
        await asyncio.wait({cancelled, done}, return_when=asyncio.FIRST_COMPLETED)
        if cancelled.done() and not done.done():
            ep.cancel(ctx)
        for f in (cancelled, done):
            f.cancel()

    def _dialog_established(self, tx: ServerTransaction, hop: Hop, ctx: ClientTransaction,
                            resp: Response) -> None:
        """A 2xx to an initial INVITE we record-routed: remember the dialog (before the 2xx
        goes upstream, so the caller's ACK finds it) and tell the SMS."""
        req = tx.request
        frm, to = req.from_, header_or_none(resp, lambda m: m.to)
        if frm is None or to is None or to.tag is None or hop.aor is None or \
                not isinstance(frm.uri, SipUri) or not req.call_id:
            log.info("2xx for INVITE %s without the tags of a dialog", req.call_id)
            return
        caller_tag = frm.tag or ""
        dlg = ProxiedDialog(req.call_id, {caller_tag: frm.uri.aor(), to.tag: hop.aor},
                            ctx.key[0], hop.addr, Hop(tx.owner, tx.response_addr))
        self.dialogs.add(dlg, caller_tag, to.tag)
        self.notices.session_established(req)

    # -- ACK and responses ------------------------------------------------------------------
    def on_ack(self, ep: SipEndpoint, req: Request, addr: Addr) -> None:
        """ACK for a 2xx: its own transaction-less request, routed like any in-dialog one
        (never answered: a refused or malformed one is dropped with a log line)."""
        try:
            why = self._relay_ack(ep, req, addr)
        except ValueError as exc:
            why = f"malformed ({exc})"
        if why is not None:
            self.counters["dropped-ack"] += 1
            self.admission.note_drop(addr, "ACK", why,
                                     header_or_none(req, lambda m: m.call_id))

    def _relay_ack(self, ep: SipEndpoint, req: Request, addr: Addr) -> str | None:
        """Forwards the ACK, or says why not."""
        trusted = addr[0] in self.admission.trusted
        if not trusted:
            why = self.admission.ack_problem(ep, req, addr)
            if why is not None:
                return why
        target = self.router.ack_target(req, trusted)
        if isinstance(target, str):
            return target
        hop = self.router.hop_to(target)
        hop.endpoint.send_stateless(req.copy(), hop.addr)
        self.counters["fwd-ACK"] += 1
        return None

    def _relay_2xx(self, tx: ServerTransaction, resp: Response) -> None:
        """A 2xx retransmission in the INVITE client transaction's Accepted state: to where
        the server transaction sends its responses (not where the 2xx's Via says)."""
        self.counters["fwd-2xx-retransmission"] += 1
        self._send_upstream(Hop(tx.owner, tx.response_addr), resp)

    def on_stray_response(self, resp: Response, addr: Addr) -> None:
        """A response no client transaction of ours is waiting for. Only a retransmitted 2xx
        of an INVITE we proxied goes on (its dialog known here, our branch at the top of its
        Via, from where the INVITE went), to where the caller's responses went."""
        dlg = header_or_none(resp, lambda m: self.dialogs.of_late_2xx(m, addr))
        if dlg is None:
            self.counters["dropped-stray-response"] += 1
            self.admission.note_drop(addr, f"{resp.status} response",
                                     "matches nothing we proxied",
                                     header_or_none(resp, lambda m: m.call_id))
            return
        self.counters["fwd-2xx-retransmission"] += 1
        self._send_upstream(dlg.upstream, resp)

    def _send_upstream(self, hop: Hop, resp: Response) -> None:
        try:
            hop.endpoint.send_response(upstream(resp), hop.addr)
        except (OSError, ValueError) as exc:
            log.info("relaying a %d to %s:%d failed: %s", resp.status, *hop.addr, exc)
