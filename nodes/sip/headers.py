"""Typed SIP header values (RFC 3261 §20): NameAddr (From/To/Contact/Route/Record-Route),
Via, CSeq, numeric headers, Content-Type, Date, plus the header-name tables.

Each type parses from unfolded header text, keeps that text, and serialises to it
unchanged until modified through ``replace()``/``with_param()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nodes.sip.grammar import (
    GEN_VALUE,
    QUOTED_RE,
    TOKEN,
    TOKEN_CHARS,
    Params,
    is_token,
    parse_params,
    quote,
    split_commas,
    unquote,
)
from nodes.sip.uri import SipUri, Uri, parse_uri

COMPACT = {
    "i": "call-id", "m": "contact", "f": "from", "t": "to", "v": "via", "l": "content-length",
    "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding",
    "o": "event", "u": "allow-events", "r": "refer-to", "b": "referred-by",
    "x": "session-expires", "a": "accept-contact", "j": "reject-contact",
    "d": "request-disposition", "y": "identity", "n": "identity-info",
}
# Headers whose value is a comma-separated list (§7.3.1); others are never split.
LIST_HEADERS = frozenset({
    "via", "contact", "route", "record-route", "allow", "supported", "require",
    "proxy-require", "unsupported", "accept", "accept-encoding", "accept-language",
    "content-encoding", "allow-events", "in-reply-to", "warning", "path", "service-route",
    "security-client", "security-server", "security-verify", "call-info", "alert-info",
    "error-info", "reply-to",
})
SINGLE_HEADERS = ("call-id", "cseq", "from", "to", "max-forwards", "content-type",
                  "content-length", "expires")
MAGIC_COOKIE = "z9hG4bK"
MAX_CSEQ = 2**31 - 1
MAX_DELTA_SECONDS = 2**32 - 1


_KEYS: dict[str, str] = {}


def header_key(name: str) -> str:
    """Canonical lookup key: lowercase long form ('v' and 'VIA' -> 'via')."""
    try:
        return _KEYS[name]
    except KeyError:
        low = name.lower()
        key = COMPACT.get(low, low)
        if len(_KEYS) < 4096:  # bounded: names come from the network
            _KEYS[name] = key
        return key


_DISPLAY_TOKENS_RE = re.compile(f"{TOKEN}(?:[ \t]+{TOKEN})*\\Z")


class NameAddr:
    """name-addr / addr-spec with header parameters (From, To, Contact, Route, ...)."""

    __slots__ = ("_raw", "display_name", "params", "uri")

    def __init__(self, uri: Uri, display_name: str | None = None,
                 params: Params | None = None) -> None:
        self.uri = uri
        self.display_name = display_name
        self.params = params if params is not None else Params()
        self._raw: str | None = None

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        s = text.strip(" \t")
        if not s:
            raise ValueError("empty name-addr")
        display: str | None = None
        if s[0] == '"':
            m = QUOTED_RE.match(s)
            if m is None:
                raise ValueError(f"unterminated quoted string in display name: {s!r}")
            display = unquote(m.group(0))
            lt = m.end()
            while lt < len(s) and s[lt] in " \t":
                lt += 1
            if lt >= len(s) or s[lt] != "<":
                raise ValueError(f"display name not followed by <URI>: {s!r}")
        else:
            lt = s.find("<")
            semi = s.find(";")
            if lt >= 0 and (semi < 0 or lt < semi):
                name = s[:lt].rstrip(" \t")
                if name:
                    if not _DISPLAY_TOKENS_RE.match(name):
                        raise ValueError(f"invalid unquoted display name {name!r}")
                    display = name
            else:
                lt = -1
        if lt >= 0:
            gt = s.find(">", lt)
            if gt < 0:
                raise ValueError(f"missing '>' in {s!r}")
            inner = s[lt + 1:gt]
            if inner != inner.strip(" \t"):
                raise ValueError(f"whitespace inside <> in {s!r}")
            uri = parse_uri(inner)
            rest = gt + 1
        else:
            end = s.find(";")
            if end < 0:
                end = len(s)
            spec = s[:end].rstrip(" \t")
            if "?" in spec or "," in spec:
                raise ValueError(f"URI with '?' or ',' must be enclosed in <>: {spec!r}")
            uri = parse_uri(spec)
            rest = end
        na = cls(uri, display, parse_params(s, rest, "header"))
        na._raw = s
        return na

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def with_param(self, name: str, value: str | None) -> NameAddr:
        new = NameAddr(self.uri, self.display_name, self.params.copy())
        new.params.set(name, value)
        return new

    def __str__(self) -> str:
        if self._raw is not None:
            return self._raw
        out = ""
        if self.display_name is not None:
            out = (self.display_name if _DISPLAY_TOKENS_RE.match(self.display_name)
                   else quote(self.display_name)) + " "
        return out + f"<{self.uri}>{self.params}"

    def __repr__(self) -> str:
        return f"NameAddr({str(self)!r})"


STAR = "*"


def parse_contacts(values: list[str]) -> list[NameAddr] | str:
    """Contact header values -> NameAddr list, or STAR for 'Contact: *'."""
    if len(values) == 1 and values[0].strip(" \t") == "*":
        return STAR
    out = []
    for v in values:
        if not v:
            raise ValueError("empty Contact value")
        na = NameAddr.parse(v)
        exp = na.params.get("expires")
        if exp is not None:
            parse_delta_seconds(exp, "Contact expires")
        out.append(na)
    return out


_VIA_RE = re.compile(
    f"[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]+"
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?")


class Via:
    """One via-parm: sent-protocol, sent-by and parameters."""

    __slots__ = ("_raw", "host", "params", "port", "protocol", "transport", "version")

    def __init__(self, host: str, port: int | None = None, *, transport: str = "UDP",
                 params: Params | None = None, protocol: str = "SIP",
                 version: str = "2.0") -> None:
        self.protocol = protocol
        self.version = version
        self.transport = transport
        self.host = host
        self.port = port
        self.params = params if params is not None else Params()
        self._raw: str | None = None

    @classmethod
    def parse(cls, text: str) -> Via:
        m = _VIA_RE.match(text)
        if m is None:
            raise ValueError(f"malformed Via value {text.strip()!r}")
        port = None
        if m.group(5) is not None:
            port = int(m.group(5))
            if port > 65535:
                raise ValueError(f"Via port {port} out of range")
        via = cls(m.group(4), port, transport=m.group(3),
                  params=parse_params(text, m.end(), "Via"),
                  protocol=m.group(1), version=m.group(2))
        ttl = via.params.get("ttl")
        if ttl is not None and not (ttl.isdigit() and int(ttl) <= 255):
            raise ValueError(f"invalid Via ttl {ttl!r}")
        rport = via.params.get("rport")
        if rport is not None and not (rport.isdigit() and int(rport) <= 65535):
            raise ValueError(f"invalid Via rport {rport!r}")
        via._raw = text.strip(" \t")
        return via

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        v = self.params.get("rport")
        return int(v) if v else None

    @property
    def sent_by(self) -> tuple[str, int]:
        """(host, port) as sent; the port defaults to 5060 (5061 for TLS)."""
        host = self.host[1:-1] if self.host.startswith("[") else self.host
        default = 5061 if self.transport.upper() == "TLS" else 5060
        return host, self.port if self.port is not None else default

    @property
    def rfc3261_branch(self) -> bool:
        b = self.branch
        return b is not None and b.startswith(MAGIC_COOKIE)

    def with_param(self, name: str, value: str | None) -> Via:
        new = Via(self.host, self.port, transport=self.transport, params=self.params.copy(),
                  protocol=self.protocol, version=self.version)
        new.params.set(name, value)
        return new

    def __str__(self) -> str:
        if self._raw is not None:
            return self._raw
        hp = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"{self.protocol}/{self.version}/{self.transport} {hp}{self.params}"

    def __repr__(self) -> str:
        return f"Via({str(self)!r})"


def parse_vias(values: list[str]) -> list[Via]:
    out = []
    for v in values:
        if not v:
            raise ValueError("empty Via value")
        out.append(Via.parse(v))
    return out


_CSEQ_RE = re.compile(f"[ \t]*([0-9]+)[ \t]+({TOKEN})[ \t]*\\Z")


@dataclass(frozen=True)
class CSeq:
    number: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        m = _CSEQ_RE.match(text)
        if m is None:
            raise ValueError(f"malformed CSeq {text.strip()!r}")
        digits = m.group(1).lstrip("0") or "0"
        if len(digits) > 10 or int(digits) > MAX_CSEQ:
            raise ValueError(f"CSeq number {m.group(1)} out of range")
        return cls(int(digits), m.group(2))

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


def _parse_uint(text: str, what: str, limit: int) -> int:
    s = text.strip(" \t")
    if not s.isdigit() or not s.isascii():
        raise ValueError(f"invalid {what} {s!r}")
    digits = s.lstrip("0") or "0"
    if len(digits) > len(str(limit)) or int(digits) > limit:
        raise ValueError(f"{what} {s} out of range")
    return int(digits)


def parse_max_forwards(text: str) -> int:
    return _parse_uint(text, "Max-Forwards", 255)


def parse_delta_seconds(text: str, what: str = "Expires") -> int:
    return _parse_uint(text, what, MAX_DELTA_SECONDS)


def parse_content_length(text: str) -> int:
    return _parse_uint(text, "Content-Length", 2**31 - 1)


_CALL_ID_WORD = r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+"
_CALL_ID_RE = re.compile(f"{_CALL_ID_WORD}(?:@{_CALL_ID_WORD})?\\Z")


def parse_call_id(text: str) -> str:
    s = text.strip(" \t")
    if not _CALL_ID_RE.match(s):
        raise ValueError(f"malformed Call-ID {s!r}")
    return s


_MEDIA_RE = re.compile(f"[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})")


@dataclass(frozen=True)
class MediaType:
    """Content-Type / Accept element: type/subtype;params (type and subtype lowercased)."""

    type: str
    subtype: str
    params: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MediaType:
        m = _MEDIA_RE.match(text)
        if m is None:
            raise ValueError(f"malformed media type {text.strip()!r}")
        params = parse_params(text, m.end(), "media type")
        return cls(m.group(1).lower(), m.group(2).lower(), tuple(params.items))

    @property
    def mime(self) -> str:
        return f"{self.type}/{self.subtype}"

    def param(self, name: str) -> str | None:
        for n, v in self.params:
            if n.lower() == name.lower():
                return unquote(v) if v and v.startswith('"') else v
        return None

    def matches(self, mime: str) -> bool:
        """Whether this (possibly wildcard) range covers the concrete type 'mime'."""
        t, _, s = mime.lower().partition("/")
        return self.type in ("*", t) and self.subtype in ("*", s)

    def __str__(self) -> str:
        return self.mime + "".join(f";{n}" if v is None else f";{n}={v}" for n, v in self.params)


_DATE_RE = re.compile(
    r"[ \t]*(Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{2}) "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) (\d{4}) "
    r"(\d{2}):(\d{2}):(\d{2}) GMT[ \t]*\Z")


def parse_date(text: str) -> tuple[int, str, int, int, int, int]:
    """rfc1123-date in GMT -> (day, month, year, hour, minute, second)."""
    m = _DATE_RE.match(text)
    if m is None:
        raise ValueError(f"malformed Date {text.strip()!r} (must be rfc1123-date in GMT)")
    day, mon, year, hh, mm, ss = m.group(2, 3, 4, 5, 6, 7)
    return int(day), mon, int(year), int(hh), int(mm), int(ss)


def parse_tokens(values: list[str], what: str) -> list[str]:
    """Option-tag style lists (Require, Supported, Allow ...)."""
    out = []
    for v in values:
        if not is_token(v):
            raise ValueError(f"invalid {what} value {v!r}")
        out.append(v)
    return out


__all__ = [
    "COMPACT", "GEN_VALUE", "LIST_HEADERS", "MAGIC_COOKIE", "SINGLE_HEADERS", "STAR",
    "TOKEN_CHARS", "CSeq", "MediaType", "NameAddr", "SipUri", "Via", "header_key",
    "parse_call_id", "parse_contacts", "parse_content_length", "parse_date",
    "parse_delta_seconds", "parse_max_forwards", "parse_tokens", "parse_vias", "split_commas",
]
