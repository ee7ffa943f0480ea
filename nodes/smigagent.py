"""A terminal's part in service migration (Fig 3): asks for a switch, answers one, sets up
the moved media channel, completes, hands over, rekeys.

Every step is an event `fig3` with its step number, in the terminal's own log, so that the
experiments can line the steps of all processes up (DESIGN §2, Measurements).

SMIG messages are taken only from the session management server (and presence results only
from the presence server): the proxy refuses a terminal that claims to be one of them, so
anything else is another terminal's attempt to drive this one, refused with 403. What a
message asks for is checked in full (keys parsed, SAs built) before any state changes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from nodes import smig
from nodes.control import CommandError
from nodes.ipsec.api import IPsecError
from nodes.mediakeys import M2mKey, Role
from nodes.mediasession import (
    MediaError,
    MediaSession,
    check_media_address,
    check_media_port,
    reused_keys,
)
from nodes.sip.endpoint import new_tag
from nodes.sip.message import Request
from nodes.sip.transaction import ServerTransaction, TransactionTimeout
from nodes.sip.uri import SipUri

if TYPE_CHECKING:
    from nodes.terminal import Terminal

log = logging.getLogger("smig")
SWITCH_WAIT = 20.0
# Which server may send which message to a terminal (everything else: the SMS).
FROM_PRESENCE = (smig.PresenceResult,)


class SmigAgent:
    def __init__(self, term: Terminal) -> None:
        self.term = term
        self._switches: dict[str, asyncio.Future[smig.Smig]] = {}
        self._queries: dict[str, asyncio.Future[smig.PresenceResult]] = {}
        self._negotiations: dict[str, asyncio.Future[M2mKey]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def emit(self, step: int | str, **fields: Any) -> None:
        self.term.events.emit("fig3", step=step, **fields)

    # -- sending --------------------------------------------------------------------------------
    async def send(self, server: str, msg: smig.Smig) -> tuple[int, str]:
        ua = self.term._ua()
        domain = self.term.config.domain
        req = Request("MESSAGE", f"sip:{server}@{domain}", [
            ("From", f"<{self.term.aor}>;tag={new_tag()}"), ("To", f"<sip:{server}@{domain}>"),
            ("Call-ID", f"{new_tag()}@{self.term.local_ip}"), ("CSeq", "1 MESSAGE"),
            ("Content-Type", smig.CONTENT_TYPE)], msg.serialize())
        try:
            resp = await ua.endpoint.request(req, self.term._proxy_hop())
        except TransactionTimeout:
            return 0, "no answer"
        return resp.status, resp.reason

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def expect(self, session: str) -> asyncio.Future[smig.Smig]:
        """A future for the SMS's verdict on `session` (switch-done or switch-refused)."""
        waiter: asyncio.Future[smig.Smig] = asyncio.get_running_loop().create_future()
        self._switches[session] = waiter
        return waiter

    def forget(self, session: str) -> None:
        self._switches.pop(session, None)

    # -- step (1): the initiator ----------------------------------------------------------------
    async def switch(self, call_id: str, to: str, media: str = "video",
                     method: str = "reuse") -> dict[str, Any]:
        """Ask the SMS to move the session to terminal `to` with `media`; returns when the
        switch is done (or refused). Fig 3 step (1)."""
        session = self.term.media.get(call_id)
        if session is None or (session.saset is None and self.term.ipsec is not None):
            raise CommandError(f"no established call {call_id!r}")
        if call_id in self._switches:
            raise CommandError(f"a switch of {call_id!r} is already running")
        try:
            smig.SwitchRequest(call_id, to, media, method).check()
            security, keys = session.export() if method == "reuse" else (None, None)
        except ValueError as exc:  # MediaError too: key reuse without keys (open mode)
            raise CommandError(str(exc)) from None
        req = smig.SwitchRequest(call_id, to, media, method, from_terminal=self.term.name,
                                 security=security, keys=keys)
        waiter = asyncio.get_running_loop().create_future()
        self._switches[call_id] = waiter
        self.emit(1, session=call_id, new_terminal=to, media=media, method=method)
        try:
            status, reason = await self.send("sms", req)
            if status != 200:
                raise CommandError(f"switch refused: {status} {reason}")
            result = await asyncio.wait_for(waiter, SWITCH_WAIT)
        except TimeoutError:
            raise CommandError("switch timed out waiting for the SMS") from None
        finally:
            self._switches.pop(call_id, None)
        if isinstance(result, smig.SwitchRefused):
            raise CommandError(f"switch refused: {result.reason}")
        assert isinstance(result, smig.SwitchDone)
        return {"session": call_id, "terminals": result.terminals}

    # -- incoming SMIG messages -------------------------------------------------------------------
    def _sender(self, tx: ServerTransaction) -> str | None:
        """Which server sent this MESSAGE ("sms" or "presence"), from its From; None for
        anyone else."""
        frm = tx.request.from_
        if frm is None or not isinstance(frm.uri, SipUri):
            return None
        domain = self.term.config.domain
        return next((server for server in ("sms", "presence")
                     if frm.uri.aor() == f"sip:{server}@{domain}"), None)

    def _refuse(self, tx: ServerTransaction, status: int, reason: str, why: str) -> None:
        frm = tx.request.from_
        self.term.counters[f"smig-refused-{status}"] += 1
        log.info("%s: SMIG refused (%d): %s", self.term.name, status, why)
        self.term.events.emit("smig-refused", status=status, why=why,
                              sender=str(frm.uri) if frm else None)
        tx.reply(status, reason)

    async def on_message(self, tx: ServerTransaction) -> None:
        sender = self._sender(tx)
        if sender is None:
            self._refuse(tx, 403, "SMIG only from the session management server",
                         "not from the SMS or presence")
            return
        try:
            msg = smig.parse(tx.request.body)
        except ValueError as exc:
            self._refuse(tx, 400, "Bad SMIG body", str(exc))
            return
        wanted = "presence" if isinstance(msg, FROM_PRESENCE) else "sms"
        if sender != wanted:
            self._refuse(tx, 403, f"{msg.TYPE} only from the {wanted} server",
                         f"{msg.TYPE} from {sender}")
            return
        try:
            self._check(msg)
        except LookupError as exc:
            self._refuse(tx, 481, "No such session here", str(exc))
            return
        except ValueError as exc:  # MediaError too
            self._refuse(tx, 488, "Not Acceptable Here", str(exc))
            return
        handler = {
            smig.LinkConfig: self.term.linkswitch.on_link_config,
            smig.SwitchRequest: self._on_switch_request,
            smig.PresenceResult: self._on_presence_result,
            smig.SessionConfig: self._on_session_config,
            smig.SwitchDone: self._on_switch_done,
            smig.SwitchRefused: self._on_switch_refused,
            smig.Rekey: self._on_rekey,
            smig.End: self._on_end,
        }.get(type(msg))
        if handler is None:
            self._refuse(tx, 400, f"A terminal does not take {msg.TYPE}", msg.TYPE)
            return
        tx.reply(200)
        self._spawn(self._run(msg, handler(msg)))  # type: ignore[operator]

    def _check(self, msg: smig.Smig) -> None:
        """What can be checked before the 200: a bad key, address or a link config this
        terminal cannot take (LookupError: no such session; ValueError: unusable)."""
        if isinstance(msg, smig.LinkConfig):
            # Fig 4: the moving side must be able to receive before it says yes
            self.term.linkswitch.prepare(msg)
        elif isinstance(msg, smig.Rekey) and msg.key:
            M2mKey.parse(msg.key)
        elif isinstance(msg, smig.SessionConfig):
            if msg.terminal != self.term.name:
                raise ValueError(f"session-config for {msg.terminal}, this is "
                                 f"{self.term.name}")
            capabilities = self.term.config.terminals[self.term.name].capabilities
            if msg.media not in capabilities:
                raise ValueError(f"this terminal does not do {msg.media}")
            check_media_address(msg.peer_address, "peer")
            if msg.method == "reuse":
                if msg.security is None or msg.keys is None:
                    raise ValueError("session-config for key reuse without keys")
                reused_keys(msg.security, msg.keys)

    async def _run(self, msg: smig.Smig, work: Any) -> None:
        """A message's work in the background: what goes wrong is one clear line, once."""
        try:
            await work
        except (CommandError, ValueError, IPsecError) as exc:  # MediaError is a ValueError
            log.info("%s: %s for %s failed: %s", self.term.name, msg.TYPE, msg.session, exc)
            self.term.events.emit("smig-failed", type=msg.TYPE, session=msg.session,
                                  why=str(exc))

    async def _on_switch_request(self, msg: smig.SwitchRequest) -> None:
        """Step (2) arrives at the peer; step (3): pick our terminal via presence, answer
        with the same security information and keys."""
        session = self.term.media.get(msg.session)
        self.emit(2, session=msg.session, keys_received=msg.keys is not None)
        if session is None:
            await self.send("sms", smig.SwitchResponse(msg.session, False,
                                                       reason="no such call here"))
            return
        terminal = await self._pick_terminal(msg.media)
        if terminal is None:
            await self.send("sms", smig.SwitchResponse(
                msg.session, False, reason=f"no registered terminal can do {msg.media}"))
            return
        try:
            security, keys = session.export() if msg.method == "reuse" else (None, None)
        except MediaError as exc:
            await self.send("sms", smig.SwitchResponse(msg.session, False, reason=str(exc)))
            return
        self.emit(3, session=msg.session, new_terminal=terminal)
        await self.send("sms", smig.SwitchResponse(msg.session, True, terminal,
                                                   security=security, keys=keys))

    async def _pick_terminal(self, media: str) -> str | None:
        query = f"q-{new_tag()}"
        waiter = asyncio.get_running_loop().create_future()
        self._queries[query] = waiter
        user = self.term.config.terminals[self.term.name].user
        try:
            status, _ = await self.send("presence", smig.PresenceQuery(query, user, media))
            if status != 200:
                return None
            result = await asyncio.wait_for(waiter, 5.0)
        except TimeoutError:
            return None
        finally:
            self._queries.pop(query, None)
        able = [t for t in result.terminals if isinstance(t, dict)
                and isinstance(t.get("terminal"), str) and t.get("registered") is True
                and isinstance(t.get("capabilities"), list) and media in t["capabilities"]]
        # Prefer another terminal than this one: that is what a terminal switch is for.
        able.sort(key=lambda t: t["terminal"] == self.term.name)
        return able[0]["terminal"] if able else None

    async def _on_presence_result(self, msg: smig.PresenceResult) -> None:
        waiter = self._queries.get(msg.session)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    async def _on_session_config(self, msg: smig.SessionConfig) -> None:
        """Steps (5)-(7) at a new terminal: set up the channel, report completion. The new
        channel is made ready (keys checked or negotiated, SAs built) before a session this
        terminal already has for it is replaced; if it cannot be, the old one stays."""
        self.emit(5, session=msg.session, media=msg.media, method=msg.method)
        term = self.term
        role = Role.OFFERER if msg.role == "offerer" else Role.ANSWERER
        try:
            session = MediaSession(role, term.local_ip, msg.media, term.media_log(),
                                   term.ipsec, term.media_wav(), term.media_loop,
                                   term._spis_in_use(), port=msg.local_port)
        except (MediaError, ValueError) as exc:
            term.events.emit("smig-failed", session=msg.session, why=str(exc))
            return
        remote = (msg.peer_address, msg.peer_port)
        try:
            if msg.method == "reuse":
                session.adopt(msg.security, msg.keys, remote, msg.session)
            else:
                await self._negotiate(session, msg, remote)
        except MediaError as exc:
            term.events.emit("smig-failed", session=msg.session, why=str(exc))
            await session.close("switch failed")
            return
        old = term.media.pop(msg.session, None)
        if old is not None:  # (reused keys: its SAs have the same SPIs, so they go first)
            await old.close("replaced by a switch")
        try:
            session.establish(msg.session)  # step (6): SPD and SAD
        except MediaError as exc:
            term.events.emit("smig-failed", session=msg.session, why=str(exc))
            await session.close("switch failed")
            return
        term.media[msg.session] = session
        self.emit(6, session=msg.session, spi_out=session.saset.outbound.spi
                  if session.saset else None, reused=msg.method == "reuse")
        session.start_sending()  # step (8) starts as soon as our half is up
        self.emit(7, session=msg.session)
        await self.send("sms", smig.SwitchComplete(msg.session, term.name))

    async def _negotiate(self, session: MediaSession, msg: smig.SessionConfig,
                         remote: tuple[str, int]) -> None:
        """The baseline (T-B): fresh keys between the new terminals before switching."""
        session.remote = (check_media_address(remote[0], "peer"),
                          check_media_port(remote[1], "peer"))
        waiter = asyncio.get_running_loop().create_future()
        self._negotiations[msg.session] = waiter
        try:
            if session.role is Role.OFFERER:
                mine = M2mKey.fresh(self.term._spis_in_use())
                session.local_key = mine
                await self.send("sms", smig.Rekey(msg.session, "offer", self.term.name,
                                                  mine.serialize(), "negotiate"))
                theirs = await asyncio.wait_for(waiter, SWITCH_WAIT)
                session.check_algorithms(theirs)
                session.remote_key = theirs
            else:
                theirs = await asyncio.wait_for(waiter, SWITCH_WAIT)
                session.check_algorithms(theirs)
                session.remote_key = theirs
                session.local_key = M2mKey.fresh(self.term._spis_in_use())
                await self.send("sms", smig.Rekey(msg.session, "answer", self.term.name,
                                                  session.local_key.serialize(), "negotiate"))
        except TimeoutError:
            raise MediaError("key negotiation timed out") from None
        finally:
            self._negotiations.pop(msg.session, None)
        self.emit("negotiated", session=msg.session)

    async def _on_switch_done(self, msg: smig.SwitchDone) -> None:
        term = self.term
        waiter = self._switches.get(msg.session)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)
        if term.name not in msg.terminals:
            # An old terminal: the initiator ends the INVITE dialog (BYE drops its media SAs).
            if waiter is not None and msg.session in term.calls:
                self.emit("handover", session=msg.session)
                await term.hangup(msg.session)
            return
        session = term.media.get(msg.session)
        if session is not None:
            session.finish_move()  # a link switch: drop what served the old address
        if session is not None and session.role is Role.OFFERER and session.keys is not None:
            # Step (9): the reused keys crossed the network; replace them.
            mine = session.rekey_offer(term._spis_in_use())
            self.emit(9, session=msg.session, phase="offer")
            await self.send("sms", smig.Rekey(msg.session, "offer", term.name,
                                              mine.serialize()))

    async def _on_switch_refused(self, msg: smig.SwitchRefused) -> None:
        waiter = self._switches.get(msg.session)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)
        self.term.events.emit("switch-refused", session=msg.session, reason=msg.reason)

    async def _on_rekey(self, msg: smig.Rekey) -> None:
        term = self.term
        if msg.purpose == "negotiate":
            waiter = self._negotiations.get(msg.session)
            if waiter is not None and not waiter.done() and msg.key:
                waiter.set_result(M2mKey.parse(msg.key))
            return
        session = term.media.get(msg.session)
        if session is None or term.ipsec is None:
            return
        self.emit(9, session=msg.session, phase=msg.phase, received=True)
        if msg.phase == "offer" and msg.key:
            mine = session.rekey_answer(M2mKey.parse(msg.key), term._spis_in_use())
            await self.send("sms", smig.Rekey(msg.session, "answer", term.name,
                                              mine.serialize()))
        elif msg.phase == "answer" and msg.key:
            session.rekey_commit(M2mKey.parse(msg.key))
            await self.send("sms", smig.Rekey(msg.session, "commit", term.name))
        elif msg.phase == "commit":
            session.rekey_switch_outbound()
            await self.send("sms", smig.Rekey(msg.session, "done", term.name))
            self.emit("rekeyed", session=msg.session, spi_out=session.saset.outbound.spi
                      if session.saset else None)
        elif msg.phase == "done":
            session.rekey_finish()
            self.emit("rekeyed", session=msg.session, spi_out=session.saset.outbound.spi
                      if session.saset else None)

    async def _on_end(self, msg: smig.End) -> None:
        term = self.term
        if msg.session in term.calls:  # still an INVITE dialog: end it properly (BYE)
            await term.hangup(msg.session)
        session = term.media.pop(msg.session, None)
        if session is not None:
            await session.close("session ended")
        term.events.emit("session-ended", session=msg.session, reason=msg.reason)

    async def send_raw(self, server: str, body: str) -> dict[str, Any]:
        """Send any body as a SMIG MESSAGE to the SMS or presence (a lab tool: craft, and
        watch the server refuse, malformed or unauthorised requests)."""
        if server not in ("sms", "presence"):
            raise CommandError(f"server must be sms or presence, got {server!r}")
        ua = self.term._ua()
        domain = self.term.config.domain
        req = Request("MESSAGE", f"sip:{server}@{domain}", [
            ("From", f"<{self.term.aor}>;tag={new_tag()}"), ("To", f"<sip:{server}@{domain}>"),
            ("Call-ID", f"{new_tag()}@{self.term.local_ip}"), ("CSeq", "1 MESSAGE"),
            ("Content-Type", smig.CONTENT_TYPE)], body.encode())
        try:
            resp = await ua.endpoint.request(req, self.term._proxy_hop())
        except TransactionTimeout:
            return {"status": None, "reason": "no answer"}
        return {"status": resp.status, "reason": resp.reason}

    def export(self, call_id: str) -> dict[str, Any]:
        """The security information and keys of a call, as a switch request carries them
        (a lab tool for building requests by hand; they travel only inside ESP)."""
        session = self.term.media.get(call_id)
        if session is None:
            raise CommandError(f"no secure call {call_id!r}")
        try:
            security, keys = session.export()
        except MediaError as exc:
            raise CommandError(f"no secure call {call_id!r}: {exc}") from None
        return {"security": security, "keys": keys}

    async def end(self, session: str) -> dict[str, Any]:
        """Tear an anchored session down everywhere (through the SMS)."""
        if not session:
            raise CommandError("end: empty session")
        status, reason = await self.send("sms", smig.End(session))
        if status != 200:
            raise CommandError(f"end refused: {status} {reason}")
        media = self.term.media.pop(session, None)
        if media is not None:
            await media.close("session ended")
        return {"session": session, "status": status}
