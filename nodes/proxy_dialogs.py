"""The INVITE dialogs this proxy record-routed (DESIGN §2 "Routes and trust"), and the hops
messages take.

A request inside a dialog, and an ACK for a 2xx, must belong to one of these dialogs and go
from one of its parties to the other; a 2xx retransmission after the INVITE transaction is
relayed only for one of them, and only to where the caller's responses went.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Request, Response
from nodes.sip.transport import Addr

MAX_DIALOGS = 10_000  # dialogs remembered at most; the oldest is forgotten first

DialogKey = tuple[str, str, str]


@dataclass(frozen=True)
class Hop:
    """Where to send a forwarded request, from which of our endpoints, and (when the next
    hop is a terminal) whose binding it is."""

    endpoint: SipEndpoint
    addr: Addr
    aor: str | None = None


@dataclass
class ProxiedDialog:
    """An INVITE dialog this proxy record-routed. In-dialog requests must belong to one and
    go from one party to the other; a late 2xx retransmission of its INVITE goes to where
    the caller's responses went, never where the 2xx's own Via says."""

    call_id: str
    parties: dict[str, str]  # dialog tag -> AOR of the party that chose it
    invite_branch: str  # the branch of our Via on the initial INVITE
    callee_addr: Addr  # where that INVITE went
    upstream: Hop  # where the caller's responses go, and from which endpoint

    def peer(self, tag: str, sender: str) -> str | None:
        """The other party's AOR, if `sender` is the party that chose `tag`."""
        if self.parties.get(tag) != sender:
            return None
        others = [aor for t, aor in self.parties.items() if t != tag]
        return others[0] if others else None


def dialog_key(call_id: str, tag_a: str, tag_b: str) -> DialogKey:
    """The same key whichever party sends (its tag is the From tag)."""
    return (call_id, tag_a, tag_b) if tag_a <= tag_b else (call_id, tag_b, tag_a)


class Dialogs(dict[DialogKey, ProxiedDialog]):
    """The dialogs proxied here, by `dialog_key`, oldest first. A dict itself, so that
    whoever only looks (the status, a test) needs nothing more."""

    def find(self, call_id: str, tag_a: str, tag_b: str) -> ProxiedDialog | None:
        return self.get(dialog_key(call_id, tag_a, tag_b))

    def add(self, dlg: ProxiedDialog, caller_tag: str, callee_tag: str) -> None:
        """Remembers a dialog (a re-established one becomes the newest), forgetting the
        oldest beyond MAX_DIALOGS."""
        key = dialog_key(dlg.call_id, caller_tag, callee_tag)
        self.pop(key, None)
        if len(self) >= MAX_DIALOGS:
            del self[next(iter(self))]
        self[key] = dlg

    def end(self, req: Request) -> None:
        """A BYE went through (whatever its answer): its dialog is over."""
        frm, to = req.from_, req.to
        if frm is not None and to is not None and req.call_id:
            self.pop(dialog_key(req.call_id, frm.tag or "", to.tag or ""), None)

    def of_late_2xx(self, resp: Response, addr: Addr) -> ProxiedDialog | None:
        """The dialog a 2xx retransmission from `addr` belongs to: an INVITE's 2xx, its
        dialog known here, our branch at the top of its Via, from where the INVITE went
        (ValueError if a header it needs is malformed)."""
        cseq, frm, to = resp.cseq, resp.from_, resp.to
        if not 200 <= resp.status < 300 or cseq is None or cseq.method != "INVITE" or \
                frm is None or to is None or not resp.call_id:
            return None
        dlg = self.find(resp.call_id, frm.tag or "", to.tag or "")
        if dlg is None or dlg.callee_addr != addr or \
                resp.vias[0].branch != dlg.invite_branch:
            return None
        return dlg
