"""Fig 4 — link-interface switch at a terminal, its triggers, and the two baselines.

* `proposed` (the paper): register through the new interface (Fig 1) with a REGISTER whose
  body names the sessions; right after that registration the SMS configures both ends.
* `register-then-switch` (baseline B1): register through the new interface first, then a
  separate switch request (SIP MESSAGE) to the SMS.
* `reinvite` (baseline B2): classic SIP mobility — register, then a re-INVITE from the new
  address with fresh media keys (`a=m2m-key`).

All three log the same step names where the steps are the same (`fig4` events: trigger,
register, registered, switch-request, link-config, media-moved, switch-complete, done).
Triggers: carrier loss on the active interface (netlink link events), media timeout (no
RTP for a while: a silent blackhole keeps the carrier up), or a command.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from nodes import smig
from nodes.control import CommandError
from nodes.linkmon import Cause, LinkMonitor, MediaTimeout, Trigger
from nodes.mediakeys import M2mKey, Role, set_media_key
from nodes.mediasession import MediaError, MediaSession, check_media_address, remote_media
from nodes.sip.sdp import SessionDescription
from nodes.sip.transaction import ServerTransaction

if TYPE_CHECKING:
    from nodes.terminal import Terminal

log = logging.getLogger("linkswitch")
METHODS = ("proposed", "register-then-switch", "reinvite")
DONE_WAIT = 20.0
MAX_MEDIA_TIMEOUT = 60.0  # seconds; longer is no "link failure" detection any more


def check_media_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not 0 < value <= MAX_MEDIA_TIMEOUT:
        raise ValueError(f"media_timeout must be a number of seconds in (0, "
                         f"{MAX_MEDIA_TIMEOUT:g}], got {value!r}")
    return float(value)


class LinkSwitcher:
    def __init__(self, term: Terminal) -> None:
        self.term = term
        self.busy = False
        self.linkmon: LinkMonitor | None = None
        self.watchdog: MediaTimeout | None = None
        self.auto_method: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def emit(self, step: str, **fields: Any) -> None:
        self.term.events.emit("fig4", step=step, **fields)

    # -- triggers ---------------------------------------------------------------------------------
    async def arm(self, method: str, media_timeout: float) -> None:
        """Watch the interfaces' carrier and the media; switch by `method` when either fails.
        Everything is checked and built first: a ValueError leaves the triggers as they were."""
        if method not in METHODS:
            raise ValueError(f"unknown link-switch method {method!r} (one of {METHODS})")
        watchdog = MediaTimeout(self._last_media_ns, self._on_media_timeout,
                                timeout=check_media_timeout(media_timeout), path="media")
        if self.linkmon is None:
            linkmon = LinkMonitor(list(self.term.interfaces), self._on_carrier)
            await linkmon.start()
            self.linkmon = linkmon
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.watchdog = watchdog
        watchdog.start()
        self.auto_method = method

    async def set_auto(self, method: str, media_timeout: float = 0.3) -> dict[str, Any]:
        """Control command: switch automatically by `method` on failures ("off": don't)."""
        if method != "off" and method not in METHODS:
            raise CommandError(f"unknown method {method!r} (off or one of {', '.join(METHODS)})")
        try:
            timeout = check_media_timeout(media_timeout)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if method == "off":
            self.auto_method = None
        elif self.linkmon is None or self.watchdog is None or \
                self.watchdog.timeout != timeout:
            await self.arm(method, timeout)
        else:
            self.auto_method = method
        return {"auto_switch": self.auto_method or "off",
                "media_timeout": self.watchdog.timeout if self.watchdog else None}

    async def disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.linkmon is not None:
            await self.linkmon.stop()
        for task in list(self._tasks):
            task.cancel()

    def _last_media_ns(self) -> int | None:
        times = [m.receiver.last_ns for m in self.term.media.values() if m.receiver.last_ns]
        return max(times) if times else None

    def _on_carrier(self, ifname: str, carrier: bool, t_ns: int) -> None:
        self.term.events.emit("carrier", iface=ifname, carrier=carrier)
        if not carrier and self.term.interfaces.get(ifname) == self.term.active_ip:
            self._fire(Trigger(Cause.CARRIER_LOSS, ifname, t_ns))

    def _on_media_timeout(self, trigger: Trigger) -> None:
        self._fire(trigger)

    def _fire(self, trigger: Trigger) -> None:
        self.term.events.emit(**trigger.to_event())
        if self.busy or self.auto_method is None:
            return
        target = self._other_interface()
        if target is None:
            self.term.events.emit("fig4", step="no-other-interface", cause=str(trigger.cause))
            return
        task = asyncio.ensure_future(self.switch(target, self.auto_method, str(trigger.cause)))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.term.events.emit("fig4", step="failed", error=str(task.exception()))

    def _other_interface(self) -> str | None:
        for name, ip in self.term.interfaces.items():
            if ip != self.term.active_ip and (self.linkmon is None or self.linkmon.carrier(name)):
                return name
        return None

    # -- the switch -------------------------------------------------------------------------------
    async def switch(self, via: str, method: str = "proposed",
                     cause: str = "command") -> dict[str, Any]:
        """Move every session to interface `via` (its name or address) by `method`."""
        term = self.term
        if method not in METHODS:
            raise CommandError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
        new_ip = term.interfaces.get(via) or (via if via in term.interfaces.values() else None)
        if new_ip is None:
            raise CommandError(f"no interface {via!r} (have: {', '.join(term.interfaces)})")
        if new_ip == term.active_ip:
            raise CommandError(f"already on {via}")
        if term.secreg is None:
            raise CommandError("a link switch needs the ipsec-m2ms mode")
        if self.busy:
            raise CommandError("a link switch is already running")
        self.busy = True
        t0 = time.time_ns()
        sessions = [cid for cid, m in term.media.items() if m.remote is not None]
        self.emit("trigger", cause=cause, method=method, via=via, sessions=sessions)
        try:
            waiters = {cid: term.smig.expect(cid) for cid in sessions} \
                if method != "reinvite" else {}
            body = smig.link_switch_body(sessions) if method == "proposed" and sessions \
                else None
            self.emit("register", method=method, via=via)
            await term.register_via(new_ip, body)
            self.emit("registered", method=method, via=via)
            if method == "register-then-switch":
                for cid in sessions:
                    self.emit("switch-request", session=cid)
                    status, reason = await term.smig.send(
                        "sms", smig.LinkSwitch(cid, term.name, new_ip))
                    if status != 200:
                        raise CommandError(f"switch refused: {status} {reason}")
            elif method == "reinvite":
                for cid in sessions:
                    await self._reinvite(cid, new_ip)
            for cid, waiter in waiters.items():
                try:
                    result = await asyncio.wait_for(waiter, DONE_WAIT)
                except TimeoutError:
                    raise CommandError(f"link switch of {cid} timed out") from None
                if isinstance(result, smig.SwitchRefused):
                    raise CommandError(f"link switch refused: {result.reason}")
        finally:
            self.busy = False
            for cid in sessions:
                term.smig.forget(cid)
        took = time.time_ns() - t0
        self.emit("done", method=method, via=via, took_ms=round(took / 1e6, 3))
        return {"via": via, "address": new_ip, "method": method, "sessions": sessions,
                "took_ms": round(took / 1e6, 3)}

    # -- Fig 4 at the terminals: link-config ------------------------------------------------------
    def prepare(self, msg: smig.LinkConfig) -> None:
        """Before answering the SMS: the link config is usable (MediaError says why not,
        and nothing changes), and the moving terminal can receive on its new address."""
        session = self.term.media.get(msg.session)
        if session is None or session.remote is None:
            raise LookupError(f"no session {msg.session!r} here")
        address = check_media_address(msg.address, "link-config")
        if msg.terminal == self.term.name:
            if address not in self.term.interfaces.values():
                raise MediaError(f"link-config: {address} is not an address of this "
                                 "terminal")
            session.prepare_move_local(address)
        elif address == session.local_ip:
            raise MediaError(f"link-config: {address} is this terminal's own address")

    async def on_link_config(self, msg: smig.LinkConfig) -> None:
        session = self.term.media.get(msg.session)
        if session is None:
            return
        self.emit("link-config", session=msg.session, terminal=msg.terminal)
        try:
            if msg.terminal == self.term.name:
                session.move_local(msg.address)
            else:
                session.move_remote(msg.address)
        except MediaError as exc:
            self.emit("failed", session=msg.session, error=str(exc))
            return
        self.emit("media-moved", session=msg.session, address=msg.address)
        self.emit("switch-complete", session=msg.session)
        await self.term.smig.send("sms", smig.SwitchComplete(msg.session, self.term.name))

    # -- baseline B2: re-INVITE with fresh keys ---------------------------------------------------
    async def _reinvite(self, cid: str, new_ip: str) -> None:
        term = self.term
        dlg = term.calls.get(cid)
        session = term.media.get(cid)
        if dlg is None or session is None or term.ua is None:
            return
        mine = M2mKey.fresh(term._spis_in_use())
        sdp = _sdp(session, new_ip, mine)
        self.emit("switch-request", session=cid, kind="re-INVITE")
        resp = await term.ua.request(dlg, "INVITE", body=sdp, content_type="application/sdp")
        if resp.status != 200:
            raise CommandError(f"re-INVITE refused: {resp.status} {resp.reason}")
        try:
            _, remote, theirs = remote_media(resp.body, session.kind)
            if theirs is None:
                raise MediaError("SDP without a=m2m-key")
            session.renegotiate(Role.OFFERER, mine, theirs, local_ip=new_ip, remote=remote)
        except MediaError as exc:  # the peer has moved to keys we cannot use: end the call
            await term.hangup(cid)
            raise CommandError(f"re-INVITE answer unusable: {exc}; call ended (BYE)") from None
        self.emit("media-moved", session=cid, address=new_ip)
        self.emit("switch-complete", session=cid)

    def on_reinvite(self, tx: ServerTransaction, cid: str) -> None:
        """The peer's side of B2: answer with a fresh key, move media to the new address."""
        term = self.term
        session = term.media.get(cid)
        if session is None:
            tx.reply(488, "No media session")
            return
        mine = M2mKey.fresh(term._spis_in_use())
        try:  # everything checked and the new SAs in place before the 200
            _, remote, theirs = remote_media(tx.request.body, session.kind)
            if theirs is None:
                raise MediaError("SDP without a=m2m-key")
            if remote[0] == session.local_ip:
                raise MediaError(f"SDP c= {remote[0]} is this terminal's own address")
            session.renegotiate(Role.ANSWERER, mine, theirs, remote=remote)
        except MediaError as exc:
            term.refuse_sdp(tx, cid, exc)
            return
        assert term.ua is not None
        tx.reply(200, headers=[("Contact", f"<{term.ua.contact}>")],
                 body=_sdp(session, session.local_ip, mine), content_type="application/sdp")
        self.emit("media-moved", session=cid, address=remote[0], kind="re-INVITE")


def _sdp(session: MediaSession, ip: str, key: M2mKey) -> bytes:
    sd = SessionDescription.parse(session.sdp())
    text = sd.serialize().decode().replace(f"IN IP4 {session.local_ip}", f"IN IP4 {ip}")
    sd = SessionDescription.parse(text)
    set_media_key(sd.media[0], key)
    return sd.serialize()


