"""REGISTER at the proxy: sec-agree registration (Fig 1), the link-switch REGISTER (Fig 4),
the bindings, and what the SMS and presence hear of them (DESIGN §2).

In ipsec-m2ms mode a REGISTER on 5060 starts Fig 1 (challenge and pending SAs, in
`nodes/secreg.py`); the protected REGISTER on the pending SAs completes it (steps 4-5) and
may carry the sessions to move to this new address (Fig 4); later ones over the channel
refresh or remove its own terminal's bindings only. In open mode every REGISTER just binds.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from nodes import smig
from nodes.events import EventLog
from nodes.labconfig import LabConfig
from nodes.proxy_admission import UNREGISTERED, Admission, Endpoints
from nodes.registrar import Binding, Registrar
from nodes.secreg import Pending, SecRegServer
from nodes.sip.endpoint import new_tag
from nodes.sip.message import Request
from nodes.sip.transaction import ServerTransaction, TransactionTimeout
from nodes.sip.transport import Addr
from nodes.sip.uri import SipUri

log = logging.getLogger("proxy")


class Notices:
    """What the proxy tells the SMS and presence (DESIGN §2: registrations, established
    dialogs, link switches), as SMIG MESSAGEs sent in the background; only when they run
    (`--notify`)."""

    def __init__(self, config: LabConfig, listen: str, endpoints: Endpoints,
                 events: EventLog, enabled: bool,
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.config, self.listen, self.endpoints = config, listen, endpoints
        self.events = events
        self.enabled = enabled
        self.spawn = spawn  # runs a coroutine in the background

    def registration_changed(self, b: Binding, registered: bool, call_id: str,
                             servers: tuple[str, ...] = ("sms", "presence")) -> None:
        if not self.enabled:
            return
        term = self.config.terminal_of(b.aor)
        if term is None or not isinstance(b.contact.uri, SipUri):
            return
        msg = smig.Registration(call_id or "registration", term.name, registered,
                                b.contact.uri.host if registered else None)
        for server in servers:
            self.send(server, msg)

    def session_established(self, req: Request) -> None:
        if not self.enabled or req.from_ is None or req.to is None:
            return
        caller = self.config.terminal_of(str(req.from_.uri))
        callee = self.config.terminal_of(str(req.to.uri))
        if caller is None or callee is None or not req.call_id:
            return
        self.send("sms", smig.SessionEstablished(req.call_id, caller.name, callee.name))

    def send(self, server: str, msg: smig.Smig) -> None:
        self.spawn(self._send(server, msg))

    async def _send(self, server: str, msg: smig.Smig) -> None:
        endpoint = self.endpoints.main
        assert endpoint is not None
        domain = self.config.domain
        req = Request("MESSAGE", f"sip:{server}@{domain}", [
            ("From", f"<sip:proxy@{domain}>;tag={new_tag()}"), ("To", f"<sip:{server}@{domain}>"),
            ("Call-ID", f"{new_tag()}@{self.listen}"), ("CSeq", "1 MESSAGE"),
            ("Content-Type", smig.CONTENT_TYPE)], msg.serialize())
        try:
            resp = await endpoint.request(req, (self.config.servers[server], 5060))
        except TransactionTimeout:
            self.events.emit("notify-failed", server=server, type=msg.TYPE)
            return
        if resp.status >= 300:
            self.events.emit("notify-refused", server=server, type=msg.TYPE,
                             status=resp.status)


class Registration:
    def __init__(self, config: LabConfig, registrar: Registrar, secreg: SecRegServer | None,
                 endpoints: Endpoints, admission: Admission, notices: Notices,
                 link_moved: dict[str, Binding], counters: Counter[str],
                 events: EventLog) -> None:
        self.config, self.registrar = config, registrar
        self.secreg = secreg  # None in open mode
        self.endpoints = endpoints
        self.admission = admission  # refusals and drops are recorded there
        self.notices = notices
        self.link_moved = link_moved  # AOR -> binding it moved to (Fig 4), for the router
        self.counters, self.events = counters, events

    def register(self, tx: ServerTransaction) -> None:
        if self.secreg is None:
            self._bind(tx)
            return
        req, key = tx.request, tx.source
        if tx.owner is not self.endpoints.s:  # unprotected: the start of Fig 1
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
            if not self.registrar.bound_from(key):
                self.secreg.drop_assoc(key, "deregistered", after_answer=True)
            return
        self.admission.drop(tx, UNREGISTERED)

    def _registers_itself(self, tx: ServerTransaction, terminal: str) -> bool:
        """A channel binds only its own terminal's AOR (another one's would be hijacked)."""
        to = tx.request.to
        if to is not None and isinstance(to.uri, SipUri) and \
                to.uri.aor() == self.config.aor(terminal):
            return True
        self.admission.refuse(tx, 403, "To is not the registered terminal",
                              "forbidden-register",
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
        if term is None or not self.notices.enabled:
            return False
        binding = next((b for b in self.registrar.bindings(self.config.aor(term.name))
                        if b.source == source), None)
        if binding is not None:
            self.link_moved[binding.aor] = binding
        self.events.emit("fig4", step="link-switch-register", terminal=term.name,
                         sessions=sessions, address=source[0])
        for session in sessions:
            self.notices.send("sms", smig.LinkSwitch(session, term.name, source[0]))
        return True

    def purge(self) -> None:
        """Expired bindings go; so do the channels (SAs) no binding uses any more."""
        for b in self.registrar.purge():
            self.events.emit("expired", aor=b.aor, contact=str(b.contact.uri))
            self.notices.registration_changed(b, False, b.call_id)
            if self.secreg is not None and not self.registrar.bound_from(b.source):
                self.secreg.drop_assoc(b.source, "registration expired")

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
            self.notices.registration_changed(b, True, req.call_id or "",
                                              ("presence",) if told_sms
                                              else ("sms", "presence"))
        for b in outcome.removed:
            self.events.emit("unregistered", aor=b.aor, contact=str(b.contact.uri))
            self.notices.registration_changed(b, False, req.call_id or "")
        self.counters["registered"] += len(outcome.added)
        return 200
