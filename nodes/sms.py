"""Session management server (SMS): terminal and media switch, Fig 3, steps (1)–(9).

    A1 ──(1) switch-request + security + keys──► SMS ──(2) without them──► B1
    B1 asks presence for a terminal; B1 ──(3) switch-response + security + keys──► SMS
    SMS (4) checks both sides' keys are equal, (5) session-config ──► A2, B2
    A2, B2 (6) set SPD/SAD, (7) switch-complete ──► SMS ──switch-done──► A1, B1, A2, B2
    A2 ⇄ B2 (8) media with the reused keys; (9) rekey relayed by the SMS

The proxy tells the SMS about registrations (addresses) and established dialogs
(`session-established`). After a switch the SMS anchors the session (same session id); `end`
from a current participant ends it everywhere. Refusals are SIP errors on the MESSAGE that
asked: 404 unknown session, 403 not a participant / not your terminal, 480 new terminal not
registered, 488 terminal lacks the media, 491 switch already running, 409 keys differ, 400
malformed. Every check runs before anything changes, so a refused request changes nothing,
with two exceptions that are outcomes, not malformed messages: the peer's answer to a running
switch (step 3) — a decline, or an answer that fails step (4) or names an unusable terminal —
ends that switch (everyone is told, the session stays on its terminals); and the address in
the proxy's link-switch notice is recorded even if the switch is refused (that REGISTER did
register it).

A call between two terminals of one user (a1 → a2) is recorded with both terminals and can
be ended, but not switched (403): Fig 3 and Fig 4 move one user's side of a call with
another user, and the session's sides are that pair of users.

    python -m nodes.sms --config config/lab.json --events ... --control ...
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from nodes import smig
from nodes.server import SmigServer, reason_phrase, server_main
from nodes.sip.transaction import ServerTransaction

SMIG_PORTS = {"audio": 41000, "video": 41002}  # where switched-in terminals receive media
SWITCH_TIMEOUT = 15.0


@dataclass
class Switch:
    initiator: str  # terminal that asked (step 1)
    media: str
    method: str
    new: dict[str, str]  # user -> new terminal
    old: dict[str, str]  # user -> terminal before the switch
    security: dict[str, Any] | None
    keys: dict[str, Any] | None
    started_ns: int
    complete: set[str] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None


@dataclass
class Session:
    id: str
    terminals: dict[str, str]  # user -> current terminal
    offerer: str  # user whose side offered the media keys
    anchored: bool = False
    switch: Switch | None = None


class Refusal(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class SessionManager(SmigServer):
    name = "sms"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sessions: dict[str, Session] = {}
        self.one_user_calls: dict[str, tuple[str, str]] = {}  # id -> (caller, callee)
        self.addresses: dict[str, str] = {}  # terminal -> registered IP

    def user(self, terminal: str) -> str:
        term = self.config.terminals.get(terminal)
        return term.user if term else ""

    async def handle(self, msg: smig.Smig, sender: str, tx: ServerTransaction) -> None:
        handlers = {
            smig.SessionEstablished: self._established, smig.Registration: self._registration,
            smig.SwitchRequest: self._switch_request, smig.SwitchResponse: self._switch_response,
            smig.SwitchComplete: self._switch_complete, smig.Rekey: self._rekey,
            smig.End: self._end, smig.LinkSwitch: self._link_switch,
        }
        handler = handlers.get(type(msg))
        try:
            if handler is None:
                raise Refusal(400, f"SMS does not take {msg.TYPE}")
            handler(msg, sender)  # type: ignore[operator]
        except Refusal as exc:
            self.counters[f"refused-{exc.status}"] += 1
            self.events.emit("refused", type=msg.TYPE, session=msg.session, sender=sender,
                             status=exc.status, reason=exc.reason)
            tx.reply(exc.status, reason_phrase(exc.reason))
            if isinstance(msg, smig.LinkSwitch) and sender == "proxy" and \
                    msg.terminal in self.config.terminals:
                # The terminal registered fine; tell it that nothing will switch.
                self.send(msg.terminal, smig.SwitchRefused(msg.session, exc.reason))
            return
        tx.reply(200)

    # -- learning from the proxy ----------------------------------------------------------------
    def _established(self, msg: smig.SessionEstablished, sender: str) -> None:
        if sender != "proxy":
            raise Refusal(403, "Only the proxy reports sessions")
        for terminal in (msg.caller, msg.callee):
            self._known(terminal)
        caller, callee = self.user(msg.caller), self.user(msg.callee)
        self._forget(msg.session)  # the proxy's latest word on this Call-ID wins
        if caller == callee:
            self.one_user_calls[msg.session] = (msg.caller, msg.callee)
        else:
            self.sessions[msg.session] = Session(msg.session, {caller: msg.caller,
                                                               callee: msg.callee}, caller)
        self.events.emit("session-established", session=msg.session, caller=msg.caller,
                         callee=msg.callee, switchable=caller != callee)

    def _registration(self, msg: smig.Registration, sender: str) -> None:
        if sender != "proxy":
            raise Refusal(403, "Only the proxy reports registrations")
        self._known(msg.terminal)
        if msg.registered and msg.address:
            self.addresses[msg.terminal] = msg.address
        else:
            self.addresses.pop(msg.terminal, None)

    def _known(self, terminal: str) -> None:
        if terminal not in self.config.terminals:
            raise Refusal(400, f"Unknown terminal {terminal!r}")

    def _forget(self, session_id: str) -> None:
        old = self.sessions.pop(session_id, None)
        if old is not None and old.switch is not None and old.switch.timer is not None:
            old.switch.timer.cancel()
        self.one_user_calls.pop(session_id, None)

    # -- Fig 3 ------------------------------------------------------------------------------------
    def _lookup(self, session_id: str, sender: str) -> Session:
        """The session (404 if unknown); a one-user call is known but never switched."""
        session = self.sessions.get(session_id)
        if session is not None:
            return session
        pair = self.one_user_calls.get(session_id)
        if pair is None:
            raise Refusal(404, "Unknown session")
        if sender not in pair:
            raise Refusal(403, "Not a participant of this session")
        raise Refusal(403, f"{pair[0]} and {pair[1]} are both terminals of "
                           f"{self.user(pair[0])}: only a call between two users is switched")

    def _session_of(self, session_id: str, sender: str) -> Session:
        session = self._lookup(session_id, sender)
        if session.terminals.get(self.user(sender)) != sender:
            raise Refusal(403, "Not a participant of this session")
        return session

    @staticmethod
    def _peer(session: Session, user: str) -> str:
        """The other user of a two-user session."""
        others = [u for u in session.terminals if u != user]
        if len(others) != 1:
            raise Refusal(409, "The session has no single peer")
        return others[0]

    def _check_new(self, user: str, terminal: str, media: str) -> None:
        term = self.config.terminals.get(terminal)
        if term is None or term.user != user:
            raise Refusal(403, f"{terminal} is not a terminal of {user}")
        if terminal not in self.addresses:
            raise Refusal(480, f"{terminal} is not registered")
        if media not in term.capabilities:
            raise Refusal(488, f"{terminal} cannot do {media}")

    def _switch_request(self, msg: smig.SwitchRequest, sender: str) -> None:
        """Step (1) at the SMS, then step (2): forward to the peer without keys."""
        session = self._session_of(msg.session, sender)
        if session.switch is not None:
            raise Refusal(491, "A switch is already in progress")
        me = self.user(sender)
        if msg.new_terminal == sender:
            raise Refusal(400, f"{sender} is already the session's terminal")
        self._check_new(me, msg.new_terminal, msg.media)
        if msg.method == "reuse" and (not msg.security or not msg.keys):
            raise Refusal(400, "Key reuse needs the security information and the keys")
        peer_user = self._peer(session, me)
        sw = Switch(sender, msg.media, msg.method, {me: msg.new_terminal},
                    dict(session.terminals), msg.security, msg.keys, time.time_ns())
        sw.timer = asyncio.get_running_loop().call_later(SWITCH_TIMEOUT, self._timeout,
                                                         session.id)
        session.switch = sw
        self.events.emit("fig3", step=1, session=session.id, initiator=sender,
                         new_terminal=msg.new_terminal, media=msg.media, method=msg.method)
        forward = smig.SwitchRequest(session.id, msg.new_terminal, msg.media, msg.method,
                                     from_terminal=sender)  # step (2): no security, no keys
        self.send(session.terminals[peer_user], forward)
        self.events.emit("fig3", step=2, session=session.id,
                         to=session.terminals[peer_user], keys_removed=True)

    def _switch_response(self, msg: smig.SwitchResponse, sender: str) -> None:
        """Step (3) arrives; step (4) the key check; step (5) session configuration."""
        session = self._session_of(msg.session, sender)
        sw = session.switch
        if sw is None or sw.media == "link" or sender == sw.initiator:
            raise Refusal(481, "No switch is waiting for this answer")
        if msg.accept and not msg.new_terminal:  # malformed: refused, the switch waits on
            raise Refusal(400, "An accepting switch-response names its new terminal")
        peer_user = self.user(sender)
        if not msg.accept:
            self._abort(session, f"{sender} declined: {msg.reason or 'no reason'}")
            return
        assert msg.new_terminal is not None
        self.events.emit("fig3", step=3, session=session.id, responder=sender,
                         new_terminal=msg.new_terminal)
        new = {**sw.new, peer_user: msg.new_terminal}
        try:
            self._check_new(peer_user, msg.new_terminal, sw.media)
            if sw.method == "reuse":
                if _canonical(msg.keys) != _canonical(sw.keys) or \
                        _canonical(msg.security) != _canonical(sw.security):
                    self.events.emit("fig3", step=4, session=session.id, keys_equal=False)
                    raise Refusal(409, "Keys differ between the two sides")
                self.events.emit("fig3", step=4, session=session.id, keys_equal=True)
            configs = self._session_configs(session, sw, new)
        except Refusal as exc:
            self._abort(session, exc.reason)
            raise
        sw.new = new
        for cfg in configs:
            self.send(cfg.terminal, cfg)
        self.events.emit("fig3", step=5, session=session.id, terminals=sorted(sw.new.values()),
                         media=sw.media, method=sw.method)

    def _session_configs(self, session: Session, sw: Switch,
                         new: dict[str, str]) -> list[smig.SessionConfig]:
        """Step (5): media, where to send, security information and keys, for each new
        terminal (built before anything is sent: 480 if a terminal has gone meanwhile)."""
        port = SMIG_PORTS[sw.media]
        configs = []
        for user, terminal in new.items():
            peer = new[self._peer(session, user)]
            address = self.addresses.get(peer)
            if address is None:
                raise Refusal(480, f"{peer} is no longer registered")
            configs.append(smig.SessionConfig(
                session.id, terminal, sw.media,
                "offerer" if user == session.offerer else "answerer", port, peer,
                address, port, sw.method,
                sw.security if sw.method == "reuse" else None,
                sw.keys if sw.method == "reuse" else None))
        return configs

    def _switch_complete(self, msg: smig.SwitchComplete, sender: str) -> None:
        """Step (7): when every new terminal is done, the session moves to them."""
        session = self._lookup(msg.session, sender)
        sw = session.switch
        if sw is None or sender not in sw.new.values() or msg.terminal != sender:
            raise Refusal(403, "Not a terminal of the pending switch")
        sw.complete.add(sender)
        self.events.emit("fig3", step=7, session=session.id, terminal=sender)
        if sw.complete != set(sw.new.values()):
            return
        if sw.timer is not None:
            sw.timer.cancel()
        session.terminals = dict(sw.new)
        session.anchored = True
        session.switch = None
        done = smig.SwitchDone(session.id, sorted(sw.new.values()))
        for terminal in sorted(set(sw.old.values()) | set(sw.new.values())):
            self.send(terminal, done)
        self.events.emit("fig3-switched", session=session.id, terminals=sorted(sw.new.values()),
                         took_ns=time.time_ns() - sw.started_ns, method=sw.method)

    def _link_switch(self, msg: smig.LinkSwitch, sender: str) -> None:
        """Fig 4: a terminal has a new address for the session. Session configuration to both
        ends right away (same terminals, same keys: no security information needed)."""
        if sender not in ("proxy", msg.terminal):
            raise Refusal(403, "A link switch comes from the proxy or the terminal itself")
        self._known(msg.terminal)
        old = self.addresses.get(msg.terminal)
        if sender == "proxy":
            # The link-switch REGISTER has succeeded at the proxy, and this is also its
            # registration notice: the address is a fact, whether the switch happens or not.
            self.addresses[msg.terminal] = msg.address
        session = self._session_of(msg.session, msg.terminal)
        if session.switch is not None:
            raise Refusal(491, "A switch is already in progress")
        if old is None:
            raise Refusal(480, f"{msg.terminal} has no registered address")
        peer = session.terminals[self._peer(session, self.user(msg.terminal))]
        # Every check passed: from here on the switch runs.
        self.addresses[msg.terminal] = msg.address
        sw = Switch(msg.terminal, "link", "reuse", dict(session.terminals),
                    dict(session.terminals), None, None, time.time_ns())
        sw.timer = asyncio.get_running_loop().call_later(SWITCH_TIMEOUT, self._timeout,
                                                         session.id)
        session.switch = sw
        self.events.emit("fig4", step="link-switch", session=session.id, terminal=msg.terminal,
                         address=msg.address, via=sender)
        cfg = smig.LinkConfig(session.id, msg.terminal, msg.address, old)
        task = asyncio.ensure_future(self._configure_link(cfg, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _configure_link(self, cfg: smig.LinkConfig, peer: str) -> None:
        """The moving terminal first: its 200 means it can receive on the new address, so the
        peer may start sending there (make before break)."""
        self.events.emit("fig4", step="link-config", session=cfg.session, to=cfg.terminal)
        status = await self.send(cfg.terminal, cfg)
        if status != 200:
            session = self.sessions.get(cfg.session)
            if session is not None:
                self._abort(session, f"{cfg.terminal} could not take the link config")
            return
        self.send(peer, cfg)
        self.events.emit("fig4", step="link-config", session=cfg.session, to=peer)

    def _rekey(self, msg: smig.Rekey, sender: str) -> None:
        """Step (9) (and the baseline's negotiation): relay to the other participant."""
        session = self._lookup(msg.session, sender)
        parties = set(session.switch.new.values()) if session.switch else set()
        parties |= set(session.terminals.values())
        if sender not in parties or msg.terminal != sender:
            raise Refusal(403, "Not a participant of this session")
        targets = session.switch.new if session.switch else session.terminals
        peer = next((t for u, t in targets.items() if u != self.user(sender)), None)
        if peer is None:
            raise Refusal(409, "No peer to relay to")
        self.send(peer, msg)
        self.events.emit("fig3", step=9, session=session.id, phase=msg.phase,
                         purpose=msg.purpose, relayed=f"{sender}->{peer}")

    def _end(self, msg: smig.End, sender: str) -> None:
        pair = self.one_user_calls.get(msg.session)
        if pair is not None:
            if sender not in pair:
                raise Refusal(403, "Not a participant of this session")
            others = set(pair)
        else:
            session = self._session_of(msg.session, sender)
            others = set(session.terminals.values())
            if session.switch is not None:  # new terminals may be configured already
                others |= set(session.switch.new.values())
        self._forget(msg.session)
        for terminal in sorted(others - {sender}):
            self.send(terminal, smig.End(msg.session, f"ended by {sender}"))
        self.events.emit("session-ended", session=msg.session, by=sender)

    def _abort(self, session: Session, reason: str) -> None:
        sw = session.switch
        if sw is None:
            return
        if sw.timer is not None:
            sw.timer.cancel()
        session.switch = None
        for terminal in {sw.initiator, *sw.old.values()}:
            self.send(terminal, smig.SwitchRefused(session.id, reason))
        self.events.emit("fig3-refused", session=session.id, reason=reason)

    def _timeout(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            self._abort(session, "switch timed out")

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "addresses": dict(self.addresses),
            "sessions": {
                **{sid: {"terminals": s.terminals, "anchored": s.anchored,
                         "switching": s.switch is not None}
                   for sid, s in self.sessions.items()},
                **{sid: {"terminals": list(pair), "one_user": self.user(pair[0]),
                         "anchored": False, "switching": False}
                   for sid, pair in self.one_user_calls.items()},
            },
        }


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


if __name__ == "__main__":
    sys.exit(server_main(SessionManager))
