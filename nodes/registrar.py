"""Registrar bindings (RFC 3261 §10.3): AOR → contacts, with the source each registered from.

Pure logic, no I/O: the proxy node feeds it parsed REGISTER requests and the source address
they came from, and turns `RegisterOutcome` into a response. The source matters for the lab's
rule that requests from unregistered sources are dropped (DESIGN §1, Fig 1).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodes.sip.checks import is_ip_address
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
        # Indexes for the proxy's per-request look-ups (source of a request, target of an
        # in-dialog request): key -> {aor: number of that AOR's bindings with this key}.
        # Kept by _store(), the only place that changes _bindings.
        self._by_source: dict[Source, dict[str, int]] = {}
        self._by_contact: dict[tuple[str, int], dict[str, int]] = {}

    def _store(self, aor: str, bindings: list[Binding]) -> None:
        """Sets an AOR's bindings (none: forget it) and keeps the indexes in step."""
        old = self._bindings.get(aor, ())
        old_src, new_src = [b.source for b in old], [b.source for b in bindings]
        if old_src != new_src:  # a refresh from the same place changes neither index
            _reindex(self._by_source, aor, old_src, new_src)
        old_dst, new_dst = [_contact_key(b) for b in old], [_contact_key(b) for b in bindings]
        if old_dst != new_dst:
            _reindex(self._by_contact, aor, old_dst, new_dst)
        if bindings:
            self._bindings[aor] = bindings
        else:
            self._bindings.pop(aor, None)

    # -- queries ----------------------------------------------------------------------------
    def bindings(self, aor: str) -> list[Binding]:
        now = self._clock()
        current = self._bindings.get(aor, [])
        live = [b for b in current if b.expires_at > now]
        if len(live) != len(current):
            self._store(aor, live)
        return list(live)

    def aor_at(self, source: Source) -> str | None:
        """The AOR registered from exactly this (ip, port), if any."""
        now = self._clock()
        for aor in self._by_source.get(source, ()):
            if any(b.source == source and b.expires_at > now for b in self._bindings[aor]):
                return aor
        return None

    def bound_from(self, source: Source) -> bool:
        """Whether any live binding was registered from this (ip, port)."""
        return self.aor_at(source) is not None

    def binding_for_contact(self, host: str, port: int) -> Binding | None:
        """A live binding whose Contact is host:port (the target of an in-dialog request)."""
        now = self._clock()
        for aor in self._by_contact.get((host, port), ()):
            for b in self._bindings[aor]:
                if _contact_key(b) == (host, port) and b.expires_at > now:
                    return b
        return None

    def all_bindings(self) -> dict[str, list[Binding]]:
        return {aor: self.bindings(aor) for aor in list(self._bindings)}

    def purge(self) -> list[Binding]:
        """Drop expired bindings; returns them (the proxy logs and tears down their state)."""
        now = self._clock()
        gone: list[Binding] = []
        for aor in list(self._bindings):
            keep = [b for b in self._bindings[aor] if b.expires_at > now]
            if len(keep) != len(self._bindings[aor]):
                gone += [b for b in self._bindings[aor] if b.expires_at <= now]
                self._store(aor, keep)
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
            self._store(aor, [])
            return RegisterOutcome(200, "OK", [], [], current)
        assert isinstance(contacts, list)
        # Validate everything before changing anything.
        plan: list[tuple[NameAddr, int]] = []
        for contact in contacts:
            why = _unusable_contact(contact)
            if why is not None:
                return RegisterOutcome(400, why)
            raw = contact.params.get("expires")
            expires = int(raw) if raw is not None else header_expires
            if expires is None:
                expires = DEFAULT_EXPIRES
            if not 0 <= expires <= MAX_EXPIRES:
                return RegisterOutcome(400, f"Expires {expires} out of range 0..{MAX_EXPIRES}")
            plan.append((contact, expires))
        for contact, _ in plan:
            for b in current:  # the cheap comparisons first: URI equivalence is not
                if b.call_id == call_id and b.cseq >= cseq and _same_contact(b.contact, contact):
                    return RegisterOutcome(500, "CSeq out of order")
        now = self._clock()
        added: list[Binding] = []
        removed: list[Binding] = []
        for contact, expires in plan:
            old = [b for b in current if _same_contact(b.contact, contact)]
            if old:
                current = [b for b in current if not any(b is o for o in old)]
                removed += old
            if expires > 0:
                new = Binding(aor, contact, source, call_id, cseq, now + expires, time.time_ns())
                current.append(new)
                added.append(new)
        self._store(aor, current)
        if removed and added:  # a refreshed binding is both: report it as added only
            removed = [b for b in removed if not any(_same_contact(b.contact, a.contact)
                                                     for a in added)]
        return RegisterOutcome(200, "OK", list(current), added, removed)

    def remove_source(self, source: Source) -> list[Binding]:
        """Forget every binding registered from `source` (e.g. its SAs were torn down)."""
        gone: list[Binding] = []
        for aor in list(self._by_source.get(source, ())):
            keep = [b for b in self._bindings[aor] if b.source != source]
            gone += [b for b in self._bindings[aor] if b.source == source]
            self._store(aor, keep)
        return gone


def _unusable_contact(contact: NameAddr) -> str | None:
    """Why the proxy could not send to this Contact, or None. The lab is IP-only: a host
    name would need a resolver, and a blocking one on the proxy's event loop."""
    uri = contact.uri
    if not isinstance(uri, SipUri):
        return f"Contact {uri} is not a SIP URI"
    if not is_ip_address(uri.host):
        return f"Contact host {uri.host!r} is not an IP address"
    return None


def _same_contact(a: NameAddr, b: NameAddr) -> bool:
    return bool(a.uri.equivalent(b.uri))


def _contact_key(b: Binding) -> tuple[str, int]:
    """Contact host and port as the proxy matches a Request-URI (port 5060 by default)."""
    uri = b.contact.uri
    if isinstance(uri, SipUri):
        return uri.host, uri.port or 5060
    return str(uri), 0


def _reindex(index: dict[Any, dict[str, int]], aor: str, old: list[Any],
             new: list[Any]) -> None:
    """Moves `aor` in `index` from the keys `old` to the keys `new`. A key kept keeps its
    place, so aor_at() answers as a scan of the bindings in registration order would."""
    counts = Counter(new)
    for key in set(old) - counts.keys():
        entry = index[key]
        del entry[aor]
        if not entry:
            del index[key]
    for key, n in counts.items():
        index.setdefault(key, {})[aor] = n
