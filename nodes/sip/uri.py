"""SIP/SIPS URIs (RFC 3261 §19.1) and opaque absolute URIs of other schemes.

A parsed URI keeps its original text and serialises to it byte-exactly until it is
changed with ``replace()``. Escapes stay as written; ``*_unescaped`` give decoded
values and ``equivalent()`` implements the §19.1.4 comparison rules.
"""

from __future__ import annotations

import re
from urllib.parse import unquote as _pct_unquote

from nodes.sip.grammar import Params

_ESC = r"%[0-9A-Fa-f]{2}"
_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
_SIP_RE = re.compile(
    r"(?P<scheme>[Ss][Ii][Pp][Ss]?):"
    rf"(?:(?P<user>(?:[{_UNRESERVED}&=+$,;?/]|{_ESC})+)"
    rf"(?::(?P<password>(?:[{_UNRESERVED}&=+$,]|{_ESC})*))?@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<params>(?:;[^;?]*)*)"
    r"(?:\?(?P<headers>.*))?\Z",
    re.S,
)
_PCHAR = rf"(?:[{_UNRESERVED}\[\]/:&+$]|{_ESC})+"
_URI_PARAM_RE = re.compile(rf"({_PCHAR})(?:=({_PCHAR}))?\Z")
_HCHAR = rf"(?:[{_UNRESERVED}\[\]/?:+$]|{_ESC})"
_URI_HEADER_RE = re.compile(rf"({_HCHAR}+)=({_HCHAR}*)\Z")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*):(.+)\Z", re.S)
_BAD_OPAQUE_RE = re.compile(r'[\x00-\x20\x7f<>"]')
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.?\Z")
_IPV4_RE = re.compile(r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                      r"(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}\Z")


def unescape(text: str) -> str:
    """Decodes %HH escapes (octets that are not UTF-8 survive as surrogates)."""
    return _pct_unquote(text, errors="surrogateescape") if "%" in text else text


def _check_host(host: str) -> None:
    if host.startswith("["):
        return
    if host[:1].isdigit() and host.replace(".", "").isdigit():
        if not _IPV4_RE.match(host):
            raise ValueError(f"invalid IPv4 address {host!r}")
    elif not _HOSTNAME_RE.match(host):
        raise ValueError(f"invalid host name {host!r}")


_PARSED: dict[str, SipUri] = {}
_PARSED_MAX = 4096


class SipUri:
    """sip: / sips: URI. Fields hold the text as written (escapes undecoded)."""

    __slots__ = ("_raw", "headers", "host", "params", "password", "port", "scheme", "user")

    def __init__(self, host: str, user: str | None = None, *, scheme: str = "sip",
                 port: int | None = None, password: str | None = None,
                 params: Params | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = params if params is not None else Params()
        self.headers = headers if headers is not None else []
        self._raw: str | None = None

    @classmethod
    def parse(cls, text: str) -> SipUri:
        """Parses a SIP/SIPS URI. The same text gives the same object while it is in a
        bounded cache: a parsed URI is never changed in place (``replace()`` makes a new
        one), and a registrar sees the same few AOR and contact URIs in every request."""
        uri = _PARSED.get(text)
        if uri is None:
            uri = cls._parse(text)
            if len(_PARSED) >= _PARSED_MAX:  # bounded: URIs come from the network
                _PARSED.clear()
            _PARSED[text] = uri
        return uri

    @classmethod
    def _parse(cls, text: str) -> SipUri:
        m = _SIP_RE.match(text)
        if m is None:
            if any(c in text for c in " \t\r\n"):
                raise ValueError(f"whitespace in SIP URI {text!r}")
            raise ValueError(f"malformed SIP URI {text!r}")
        host = m.group("host")
        _check_host(host)
        port_text = m.group("port")
        port = None
        if port_text is not None:
            port = int(port_text)
            if port > 65535:
                raise ValueError(f"port {port} out of range in {text!r}")
        params = Params()
        for chunk in m.group("params").split(";")[1:]:
            pm = _URI_PARAM_RE.match(chunk)
            if pm is None:
                raise ValueError(f"invalid URI parameter {chunk!r} in {text!r}")
            params.items.append((pm.group(1), pm.group(2)))
        headers: list[tuple[str, str]] = []
        if m.group("headers") is not None:
            for chunk in m.group("headers").split("&"):
                hm = _URI_HEADER_RE.match(chunk)
                if hm is None:
                    raise ValueError(f"invalid URI header {chunk!r} in {text!r}")
                headers.append((hm.group(1), hm.group(2)))
        uri = cls(host, m.group("user"), scheme=m.group("scheme"), port=port,
                  password=m.group("password"), params=params, headers=headers)
        uri._raw = text
        return uri

    @property
    def user_unescaped(self) -> str | None:
        return None if self.user is None else unescape(self.user)

    def param(self, name: str) -> str | None:
        return self.params.get(name)

    def has_param(self, name: str) -> bool:
        return name in self.params

    @property
    def transport(self) -> str | None:
        t = self.params.get("transport")
        return t.lower() if t else None

    @property
    def lr(self) -> bool:
        return "lr" in self.params

    def host_port(self, default_port: int = 5060) -> tuple[str, int]:
        """(host, port) with IPv6 brackets removed, the default port when absent."""
        host = self.host[1:-1] if self.host.startswith("[") else self.host
        return host, self.port if self.port is not None else default_port

    def replace(self, **changes: object) -> SipUri:
        """A changed copy (it serialises canonically, no longer from the original text)."""
        new = SipUri(self.host, self.user, scheme=self.scheme, port=self.port,
                     password=self.password, params=self.params.copy(),
                     headers=list(self.headers))
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    def equivalent(self, other: object) -> bool:
        """RFC 3261 §19.1.4 URI comparison."""
        if not isinstance(other, SipUri):
            return False
        if self._raw is not None and self._raw == other._raw:
            return True  # the same text parses to the same URI (a refresh's Contact)
        if self.scheme.lower() != other.scheme.lower():
            return False
        if (self.user_unescaped, unescape(self.password or "")) != (
                other.user_unescaped, unescape(other.password or "")):
            return False
        if unescape(self.host).lower() != unescape(other.host).lower() or self.port != other.port:
            return False
        mine = {unescape(n).lower(): unescape(v or "").lower() for n, v in self.params.items}
        theirs = {unescape(n).lower(): unescape(v or "").lower() for n, v in other.params.items}
        for name in ("user", "ttl", "method", "maddr", "transport"):
            if mine.get(name) != theirs.get(name):
                return False
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                return False
        mh = {unescape(n).lower(): unescape(v) for n, v in self.headers}
        th = {unescape(n).lower(): unescape(v) for n, v in other.headers}
        return mh == th

    def aor(self) -> str:
        """Canonical address-of-record key: scheme:user@host, escapes decoded, host lower."""
        user = self.user_unescaped
        head = f"{self.scheme.lower()}:"
        return head + (f"{user}@" if user is not None else "") + self.host.lower()

    def __str__(self) -> str:
        if self._raw is not None:
            return self._raw
        out = f"{self.scheme}:"
        if self.user is not None:
            out += self.user
            if self.password is not None:
                out += ":" + self.password
            out += "@"
        out += self.host
        if self.port is not None:
            out += f":{self.port}"
        out += str(self.params)
        if self.headers:
            out += "?" + "&".join(f"{n}={v}" for n, v in self.headers)
        return out

    def __repr__(self) -> str:
        return f"SipUri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SipUri) and self.equivalent(other)

    def __hash__(self) -> int:
        return hash((self.scheme.lower(), self.user_unescaped, self.host.lower(), self.port))


class AbsoluteUri:
    """A URI of any other scheme (tel:, http:, isbn:, ...), kept opaque."""

    __slots__ = ("rest", "scheme")

    def __init__(self, scheme: str, rest: str) -> None:
        self.scheme = scheme
        self.rest = rest

    @classmethod
    def parse(cls, text: str) -> AbsoluteUri:
        m = _SCHEME_RE.match(text)
        if m is None:
            raise ValueError(f"invalid URI {text!r}: no scheme")
        if _BAD_OPAQUE_RE.search(m.group(2)):
            raise ValueError(f"invalid character in URI {text!r}")
        return cls(m.group(1), m.group(2))

    def equivalent(self, other: object) -> bool:
        return (isinstance(other, AbsoluteUri) and self.scheme.lower() == other.scheme.lower()
                and self.rest == other.rest)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.rest}"

    def __repr__(self) -> str:
        return f"AbsoluteUri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return self.equivalent(other)

    def __hash__(self) -> int:
        return hash((self.scheme.lower(), self.rest))


Uri = SipUri | AbsoluteUri


def parse_uri(text: str) -> Uri:
    """Parses any URI: SIP/SIPS with full grammar, other schemes as opaque text."""
    head = text[:5].lower()
    if head.startswith("sip:") or head == "sips:":
        return SipUri.parse(text)
    if text[:1] == "<":
        raise ValueError(f"URI must not be enclosed in <> here: {text!r}")
    return AbsoluteUri.parse(text)
