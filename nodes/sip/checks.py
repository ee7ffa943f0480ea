"""Semantic checks a UAS, registrar or proxy runs on a framed message (RFC 3261 §8.2,
§16.3, RFC 4475): which status to refuse a request with, and whether to drop a response.

``validate_request`` raises ``SipError(status, reason, headers)``; ``check_request``
returns just the status (or None when the request may be processed).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Literal

from nodes.sip.headers import MAGIC_COOKIE, SINGLE_HEADERS, STAR, MediaType, parse_tokens
from nodes.sip.message import REASONS, Request, Response
from nodes.sip.uri import SipUri

Role = Literal["uas", "proxy", "registrar"]
DEFAULT_METHODS = frozenset({"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "MESSAGE",
                             "UPDATE", "INFO", "REGISTER"})
MANDATORY = {"via": "Via", "to": "To", "from": "From", "call-id": "Call-ID", "cseq": "CSeq"}


class SipError(Exception):
    """A request refused with a status; headers are to be added to the response."""

    def __init__(self, status: int, reason: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.reason = reason if reason is not None else REASONS.get(status, "Error")
        self.headers = headers
        super().__init__(f"{status} {self.reason}")


@dataclass(frozen=True)
class Policy:
    """What the receiving element supports. Roles: uas (UA core), proxy, registrar."""

    role: Role = "uas"
    methods: frozenset[str] = DEFAULT_METHODS
    supported: frozenset[str] = frozenset()
    accept: frozenset[str] = frozenset({"application/sdp", "text/plain",
                                        "application/smig+json", "multipart/mixed"})
    schemes: frozenset[str] = frozenset({"sip", "sips"})


def _bad(reason: str) -> SipError:
    return SipError(400, reason)


def validate_request(req: Request, policy: Policy | None = None) -> None:
    """Raises SipError with the response status owed to 'req', if any."""
    policy = policy or Policy()
    if req.version != "SIP/2.0":
        raise SipError(505, "Version Not Supported")
    index = req.field_index()
    for key, name in MANDATORY.items():
        if key not in index:
            raise _bad(f"Missing {name}")
    for key in SINGLE_HEADERS:
        if len(index.get(key, ())) > 1:
            raise _bad(f"Multiple {key} header fields")
    try:
        vias = req.vias
        _ = req.to, req.from_, req.call_id, req.max_forwards, req.content_type
        cseq = req.cseq
        contacts = req.contacts
        _ = req.routes, req.expires
    except ValueError as e:
        raise _bad(f"Malformed header: {e}") from None
    assert cseq is not None
    branch = vias[0].branch
    if branch == MAGIC_COOKIE:
        raise _bad("Via branch is only the magic cookie")
    if policy.role != "proxy" and req.method not in policy.methods:
        allow = ", ".join(sorted(policy.methods))
        raise SipError(501, "Not Implemented", (("Allow", allow),))
    if cseq.method != req.method:
        raise _bad("CSeq method does not match the Request-Line")
    if req.uri.scheme.lower() not in policy.schemes:
        raise SipError(416, "Unsupported URI Scheme")
    if isinstance(req.uri, SipUri) and req.uri.headers:
        raise _bad("Request-URI must not contain headers")
    if policy.role == "proxy":
        if req.max_forwards == 0:
            raise SipError(483, "Too Many Hops")
        _check_require(req, "proxy-require", policy)
        return
    if req.method not in ("ACK", "CANCEL"):
        _check_require(req, "require", policy)
    if req.method == "ACK" or req.method == "CANCEL":
        return
    ctype = req.content_type
    if ctype is not None and req.body and ctype.mime not in policy.accept:
        raise SipError(415, "Unsupported Media Type",
                       (("Accept", ", ".join(sorted(policy.accept))),))
    if req.method == "INVITE" and req.has("accept"):
        try:
            ranges = [MediaType.parse(v) for v in req.values("accept") if v]
        except ValueError as e:
            raise _bad(f"Malformed header: {e}") from None
        if ranges and not any(r.matches("application/sdp") for r in ranges):
            raise SipError(406, "Not Acceptable")
    if policy.role == "registrar" and req.method == "REGISTER":
        to = req.to
        assert to is not None
        if to.uri.scheme.lower() not in ("sip", "sips"):
            raise _bad("To of a REGISTER must be a SIP or SIPS URI")
        if contacts == STAR and (req.expires != 0 or req.count("contact") != 1):
            raise _bad("Contact: * needs Expires: 0 and no other Contact")


def _check_require(req: Request, key: str, policy: Policy) -> None:
    try:
        tags = parse_tokens([v for v in req.values(key) if v], key)
    except ValueError as e:
        raise _bad(f"Malformed header: {e}") from None
    unknown = [t for t in tags if t not in policy.supported]
    if unknown:
        raise SipError(420, "Bad Extension", (("Unsupported", ", ".join(unknown)),))


def check_request(req: Request, policy: Policy | None = None) -> int | None:
    """The status to refuse 'req' with, or None when it may be processed."""
    try:
        validate_request(req, policy)
    except SipError as e:
        return e.status
    return None


@functools.lru_cache(maxsize=4096)  # bounded: hosts come from the network
def is_ip_address(host: str) -> bool:
    """Whether a URI or Via host is an IP literal (an IPv6 one in brackets). The lab has no
    DNS, and a name would have to be resolved by a blocking call on the event loop."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_BROADCAST_PREFIXES = ("255.255.255.255",)


def _is_broadcast(host: str) -> bool:
    if host in _BROADCAST_PREFIXES:
        return True
    first = host.split(".", 1)[0]
    return first.isdigit() and 224 <= int(first) <= 239  # IPv4 multicast


def check_response(resp: Response, role: Role = "uas") -> bool:
    """Whether a response may be processed (False: drop it silently)."""
    try:
        vias = resp.vias
        _ = resp.to, resp.from_, resp.call_id, resp.cseq
    except ValueError:
        return False
    if not vias or resp.cseq is None or resp.call_id is None:
        return False
    if resp.from_ is None or resp.to is None:
        return False
    if role == "proxy" and len(vias) > 1:
        nxt = vias[1]
        if _is_broadcast(nxt.received or nxt.host):
            return False
    return True


__all__ = ["DEFAULT_METHODS", "Policy", "Role", "SipError", "check_request",
           "check_response", "is_ip_address", "validate_request"]
