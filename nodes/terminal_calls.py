"""Fig 2 at the terminal: calls and their secure media.

INVITE and 200 carry the `a=m2m-key` nonces and SPIs (`nodes.mediasession`); each end
derives the per-direction keys and installs its media SAs itself. An offer the terminal
cannot take gets 488 with the reason in a Warning header before anything is set up; a 2xx
that is never acknowledged ends the call with a BYE (RFC 3261 §13.3.1.4); BYE removes the
media and its SAs first.

A part of `nodes.terminal.Terminal` (mixed in): `Terminal.__init__` sets up the state used
here, declared below.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodes.control import CommandError
from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import LabConfig
from nodes.mediakeys import Role
from nodes.mediasession import FORMATS, MediaError, MediaSession
from nodes.secreg import ClientChannel
from nodes.sip.dialog import Dialog, UserAgent
from nodes.sip.grammar import quote
from nodes.sip.message import Response
from nodes.sip.transaction import ServerTransaction, TransactionTimeout
from nodes.sip.transport import Addr

log = logging.getLogger("terminal")


def warning(agent: str, text: str) -> str:
    """A Warning header value (RFC 3261 §20.43, code 399) that says why, on one short
    printable line."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)[:160]
    return f"399 {agent} {quote(clean)}"


def _warning_of(resp: Response) -> dict[str, str]:
    """The Warning a refusal came with (488 says why in it), if any."""
    text = resp.get("warning")
    return {"warning": text} if text else {}


class TerminalCalls:
    """Outgoing and incoming calls, each with its media session (Fig 2)."""

    # Set by Terminal.__init__.
    name: str
    config: LabConfig
    local_ip: str
    active_ip: str  # the interface SIP and new media use (Fig 4 moves it)
    events: EventLog
    counters: Counter[str]
    ipsec: NodeIpsec | None
    ua: UserAgent | None
    channels: dict[str, ClientChannel]
    calls: dict[str, Dialog]
    media: dict[str, MediaSession]
    media_dir: Path | None
    media_loop: bool
    _media_log: EventLog | None
    _wavs: int

    if TYPE_CHECKING:  # provided by Terminal and its registration part
        def _ua(self) -> UserAgent: ...
        def _target(self, to: str) -> str: ...
        def _proxy_hop(self) -> Addr: ...

    # -- media sessions ---------------------------------------------------------------------
    def media_log(self) -> EventLog:
        """Per-packet media events go to their own file, away from the signalling steps."""
        if self._media_log is None:
            self._media_log = (EventLog(self.name, str(self.media_dir /
                                                       f"{self.name}-media.jsonl"))
                               if self.media_dir else self.events)
        return self._media_log

    def media_wav(self) -> Path | None:
        self._wavs += 1
        return self.media_dir / f"{self.name}-call{self._wavs}.wav" if self.media_dir else None

    def _media_session(self, role: Role, kind: str) -> MediaSession:
        return MediaSession(role, self.active_ip, kind, self.media_log(), self.ipsec,
                            self.media_wav(), self.media_loop, self._spis_in_use())

    def _spis_in_use(self) -> set[int]:
        spis = {sa.spi for c in self.channels.values() for sa in c.saset.sas}
        for m in self.media.values():
            spis |= m.spis()
        return spis

    def _capable(self, kind: str) -> None:
        capabilities = self.config.terminals[self.name].capabilities
        if kind not in capabilities:
            raise MediaError(f"{self.name} does not do {kind} (only "
                             f"{', '.join(capabilities)})")

    # -- outgoing ---------------------------------------------------------------------------
    async def call(self, to: str, media: str = "audio") -> dict[str, Any]:
        ua = self._ua()
        target = self._target(to)
        if media not in FORMATS:
            raise CommandError(f"unknown media {media!r} (audio or video)")
        hop = self._proxy_hop()
        try:
            self._capable(media)
            session = self._media_session(Role.OFFERER, media)
        except ValueError as exc:  # MediaError, or no free RTP port
            raise CommandError(str(exc)) from None
        tx = ua.start_invite(target, hop, body=session.sdp())
        call_id = tx.request.call_id or ""
        self.events.emit("call-started", call_id=call_id, to=target, media=media)
        try:
            resp, dlg = await ua.complete_invite(tx)
        except TransactionTimeout:
            await session.close("no answer")
            self.events.emit("call-failed", call_id=call_id, error="timeout")
            raise CommandError("call failed: no answer (Timer B)") from None
        except ValueError as exc:  # a 2xx no dialog can be made from (Contact, tags)
            await session.close("bad answer")
            self.events.emit("call-failed", call_id=call_id, error=f"unusable 2xx: {exc}")
            raise CommandError(f"call failed: unusable 2xx ({exc})") from None
        if dlg is None:
            await session.close(f"{resp.status}")
            self.events.emit("call-failed", call_id=call_id, status=resp.status)
            result = {"call_id": call_id, "status": resp.status, "reason": resp.reason}
            return {**result, **_warning_of(resp)}
        self.calls[dlg.call_id] = dlg
        try:  # the answer is checked in full before any SA goes in; the 2xx is ACKed
            session.accept_remote(resp.body)
            session.establish(call_id)
        except MediaError as exc:
            await session.close("bad answer")
            self.events.emit("call-failed", call_id=call_id, error=f"unusable answer: {exc}")
            status = await self._bye(dlg)
            raise CommandError(f"call failed: unusable answer ({exc}); the call is ended "
                               f"(BYE: {status or 'no answer'})") from None
        self.media[call_id] = session  # Fig 2: the caller's dialog is confirmed by the 2xx
        session.start_sending()
        self.events.emit("call-confirmed", call_id=call_id, peer=str(dlg.remote_uri.uri),
                         role="caller", media=media)
        return {"call_id": call_id, "status": resp.status, "reason": resp.reason}

    # -- ending -----------------------------------------------------------------------------
    async def hangup(self, call_id: str) -> dict[str, Any]:
        dlg = self.calls.get(call_id)
        if dlg is None:
            raise CommandError(f"no call {call_id!r} (calls: {', '.join(self.calls) or 'none'})")
        status = await self._bye(dlg)
        return {"call_id": call_id, "status": status}

    async def _end_media(self, call_id: str, why: str) -> None:
        session = self.media.pop(call_id, None)
        if session is not None:
            await session.close(why)

    async def _bye(self, dlg: Dialog) -> int | None:
        """Media (and its SAs) first, then the BYE; None: no answer."""
        assert self.ua is not None
        ua = self.ua
        self.calls.pop(dlg.call_id, None)
        await self._end_media(dlg.call_id, "BYE")
        status: int | None = None
        try:
            status = (await ua.request(dlg, "BYE")).status
        except (TransactionTimeout, ValueError):  # no answer, or the dialog ended meanwhile
            pass
        finally:  # also when a shutdown gives up on it
            self.events.emit("call-ended", call_id=dlg.call_id, by="local", status=status)
        return status

    async def _bye_all(self, wait: float) -> None:
        tasks = [asyncio.ensure_future(self._bye(dlg)) for dlg in list(self.calls.values())]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=wait)
        for task in pending:  # a dead peer: its BYE is given up (its media is gone already)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_ack_timeout(self, dlg: Dialog) -> None:
        """RFC 3261 §13.3.1.4: our 2xx was never acknowledged: end the session with a BYE
        (its media, and media SAs, go first)."""
        if self.calls.get(dlg.call_id) is not dlg:
            return
        self.counters["ack-timeout"] += 1
        self.events.emit("call-failed", call_id=dlg.call_id, error="2xx never acknowledged")
        await self._bye(dlg)

    # -- incoming ---------------------------------------------------------------------------
    async def _answer(self, tx: ServerTransaction) -> None:
        """An incoming call: answer with our m2m-key; SAs and receiver before the 200 goes
        out (the caller starts sending when it sees it), our sender once the ACK comes. An
        offer that cannot be used gets 488 first, with nothing set up and nothing left."""
        req = tx.request
        ua = self._ua()
        call_id = req.call_id or ""
        self.events.emit("incoming-call", call_id=call_id,
                         peer=str(req.from_.uri) if req.from_ else None)
        if call_id in self.media or call_id in self.calls:
            self.events.emit("call-refused", call_id=call_id, status=400,
                             why="Call-ID already in use")
            tx.reply(400, "Call-ID already in use")
            return
        try:
            kind = MediaSession.offered_kind(req.body)
            self._capable(kind)
        except MediaError as exc:
            self.refuse_sdp(tx, call_id, exc)
            return
        try:
            session = self._media_session(Role.ANSWERER, kind)
        except ValueError as exc:  # no free RTP port: ours, not the caller's fault
            log.warning("%s: cannot answer %s: %s", self.name, call_id, exc)
            tx.reply(503, "No media port free")
            return
        try:
            session.accept_remote(req.body)
            session.establish(call_id)
        except MediaError as exc:
            await session.close("refused")
            self.refuse_sdp(tx, call_id, exc)
            return
        self.media[call_id] = session
        new = ua.answer(tx, 200, body=session.sdp(), content_type="application/sdp")
        if new is not None:
            self.calls[new.call_id] = new
            self.events.emit("call-confirmed", call_id=new.call_id,
                             peer=str(new.remote_uri.uri), role="callee", media=session.kind)

    def refuse_sdp(self, tx: ServerTransaction, call_id: str, exc: MediaError) -> None:
        """488 for an offer this terminal cannot take, the reason in a Warning header."""
        why = str(exc)
        self.counters["refused-sdp"] += 1
        log.info("%s: 488 to %s for %s: %s", self.name, tx.request.method, call_id, why)
        self.events.emit("call-refused", call_id=call_id, status=488, why=why)
        tx.reply(488, "Not Acceptable Here",
                 headers=[("Warning", warning(self.active_ip, why))])

    def _on_ack(self, dlg: Dialog) -> None:
        session = self.media.get(dlg.call_id)
        if session is not None and session.sender is None:
            session.start_sending()
