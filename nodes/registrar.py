"""Registrar bindings (RFC 3261 §10.3): AOR → contacts, with the source each registered from.

Pure logic, no I/O: the proxy node feeds it parsed REGISTER requests and the source address
they came from, and turns `RegisterOutcome` into a response. The source matters for the lab's
rule that requests from unregistered sources are dropped (DESIGN §1, Fig 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nodes.sip.headers import STAR, NameAddr
from nodes.sip.message import Request
from nodes.sip.uri import SipUri

DEFAULT_EXPIRES = 3600
MAX_EXPIRES = 86400

Source = tuple[str, int]


@dataclass
class Binding:
    aor: str
    contact: NameAddr
    source: Source
    call_id: str
    cseq: int
    expires_at: float  # monotonic
    registered_ns: int  # wall clock, for the event logs

    def expires_in(self, now: float) -> int:
        return max(0, round(self.expires_at - now))


@dataclass
class RegisterOutcome:
    status: int
    reason: str = ""
    bindings: list[Binding] = field(default_factory=list)  # current, for the 200's Contacts
    added: list[Binding] = field(default_factory=list)
    removed: list[Binding] = field(default_factory=list)


class Registrar:
    def __init__(
        self, known_aor: Callable[[str], bool], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._known_aor = known_aor
        self._clock = clock
        self._bindings: dict[str, list[Binding]] = {}

    # -- queries ----------------------------------------------------------------------------
    def bindings(self, aor: str) -> list[Binding]:
        now = self._clock()
        live = [b for b in self._bindings.get(aor, []) if b.expires_at > now]
        if live:
            self._bindings[aor] = live
        else:
            self._bindings.pop(aor, None)
        return list(live)

    def aor_at(self, source: Source) -> str | None:
        """The AOR registered from exactly this (ip, port), if any."""
        now = self._clock()
        for aor, bindings in self._bindings.items():
            if any(b.source == source and b.expires_at > now for b in bindings):
                return aor
        return None

    def all_bindings(self) -> dict[str, list[Binding]]:
        return {aor: self.bindings(aor) for aor in list(self._bindings)}

    def purge(self) -> list[Binding]:
        """Drop expired bindings; returns them (the proxy logs and tears down their state)."""
        now = self._clock()
        gone: list[Binding] = []
        for aor in list(self._bindings):
            keep = [b for b in self._bindings[aor] if b.expires_at > now]
            gone += [b for b in self._bindings[aor] if b.expires_at <= now]
            if keep:
                self._bindings[aor] = keep
            else:
                del self._bindings[aor]
        return gone

    # -- REGISTER ---------------------------------------------------------------------------
    def register(self, req: Request, source: Source) -> RegisterOutcome:
        """Apply a REGISTER; on any refusal the bindings are left exactly as they were."""
        to = req.to
        if to is None:
            return RegisterOutcome(400, "Missing To")
        aor = to.uri.aor() if isinstance(to.uri, SipUri) else str(to.uri)
        if not self._known_aor(aor):
            return RegisterOutcome(404, "Not Found")
        try:
            contacts = req.contacts
            header_expires = req.expires
        except ValueError as exc:
            return RegisterOutcome(400, f"Bad Request ({exc})")
        call_id = req.call_id or ""
        cseq = req.cseq.number if req.cseq else 0
        current = self.bindings(aor)
        if contacts == STAR:
            if header_expires != 0 or req.count("contact") != 1:
                return RegisterOutcome(400, "Contact * needs Expires: 0 and no other Contact")
            if any(b.call_id == call_id and b.cseq >= cseq for b in current):
                return RegisterOutcome(500, "CSeq out of order")
            self._bindings.pop(aor, None)
            return RegisterOutcome(200, "OK", [], [], current)
        assert isinstance(contacts, list)
        # Validate everything before changing anything.
        plan: list[tuple[NameAddr, int]] = []
        for contact in contacts:
            raw = contact.params.get("expires")
            expires = int(raw) if raw is not None else header_expires
            if expires is None:
                expires = DEFAULT_EXPIRES
            if not 0 <= expires <= MAX_EXPIRES:
                return RegisterOutcome(400, f"Expires {expires} out of range 0..{MAX_EXPIRES}")
            plan.append((contact, expires))
        for contact, _ in plan:
            for b in current:
                if _same_contact(b.contact, contact) and b.call_id == call_id and b.cseq >= cseq:
                    return RegisterOutcome(500, "CSeq out of order")
        now = self._clock()
        added: list[Binding] = []
        removed: list[Binding] = []
        for contact, expires in plan:
            old = [b for b in current if _same_contact(b.contact, contact)]
            current = [b for b in current if not _same_contact(b.contact, contact)]
            removed += old
            if expires > 0:
                new = Binding(aor, contact, source, call_id, cseq, now + expires, time.time_ns())
                current.append(new)
                added.append(new)
        if current:
            self._bindings[aor] = current
        else:
            self._bindings.pop(aor, None)
        # A refreshed binding is both removed and added: report it as added only.
        removed = [b for b in removed if not any(_same_contact(b.contact, a.contact)
                                                 for a in added)]
        return RegisterOutcome(200, "OK", list(current), added, removed)

    def remove_source(self, source: Source) -> list[Binding]:
        """Forget every binding registered from `source` (e.g. its SAs were torn down)."""
        gone: list[Binding] = []
        for aor in list(self._bindings):
            keep = [b for b in self._bindings[aor] if b.source != source]
            gone += [b for b in self._bindings[aor] if b.source == source]
            if keep:
                self._bindings[aor] = keep
            else:
                del self._bindings[aor]
        return gone


def _same_contact(a: NameAddr, b: NameAddr) -> bool:
    return bool(a.uri.equivalent(b.uri))
