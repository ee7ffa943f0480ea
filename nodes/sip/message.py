"""SIP messages (RFC 3261 §7): framing, lazy typed header access, byte-exact round trips.

``parse_message(datagram)`` frames one UDP datagram: octets past Content-Length are
discarded, a Content-Length larger than the datagram is an error. Header fields keep
their original text, so an unchanged parsed message serialises to exactly the octets it
was parsed from. Typed values (Via, NameAddr, CSeq, ...) are parsed on first access.

Framing errors raise ``SipParseError`` (a ValueError) that says which status a UAS
should answer with (``None``: drop) and carries whatever header fields were parsed, so
``error_response()`` can still build the answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from nodes.sip.grammar import is_token, split_commas, unfold
from nodes.sip.headers import (
    LIST_HEADERS,
    STAR,
    CSeq,
    MediaType,
    NameAddr,
    Via,
    header_key,
    parse_call_id,
    parse_contacts,
    parse_content_length,
    parse_delta_seconds,
    parse_max_forwards,
    parse_vias,
)
from nodes.sip.uri import Uri, parse_uri

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    491: "Request Pending", 494: "Security Agreement Required", 500: "Server Internal Error",
    501: "Not Implemented", 503: "Service Unavailable", 504: "Server Time-out",
    505: "Version Not Supported", 513: "Message Too Large", 603: "Decline",
}
_STATUS_RE = re.compile(r"SIP/(\d+\.\d+) (\d{3}) (.*)\Z", re.S)
_VERSION_RE = re.compile(r"SIP/\d+\.\d+\Z")
_HNAME_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")
_GOOD_NAMES: set[str] = set()  # header names already seen to match _HNAME_RE
ENC = "utf-8"
ERRS = "surrogateescape"


class SipParseError(ValueError):
    """A message that cannot be framed/parsed. status: what to answer (None = drop)."""

    def __init__(self, text: str, status: int | None = None,
                 headers: list[HeaderField] | None = None, is_request: bool = False) -> None:
        super().__init__(text)
        self.status = status
        self.headers = headers
        self.is_request = is_request


class HeaderField:
    """One header field line as received (or built). Treated as immutable."""

    __slots__ = ("key", "name", "raw", "value")

    def __init__(self, name: str, value: str, raw: str | None = None,
                 key: str | None = None) -> None:
        self.name = name
        self.value = value
        self.raw = raw
        self.key = key if key is not None else header_key(name)

    def line(self) -> str:
        return self.raw if self.raw is not None else f"{self.name}: {self.value}"

    def __repr__(self) -> str:
        return f"HeaderField({self.name!r}, {self.value!r})"


HeaderInput = HeaderField | tuple[str, Any]


def _field(h: HeaderInput) -> HeaderField:
    return h if isinstance(h, HeaderField) else HeaderField(h[0], str(h[1]))


class Message:
    """Common part of requests and responses: ordered header fields and body octets."""

    __slots__ = ("_body", "_cache", "_start_raw", "headers")

    def __init__(self, headers: Iterable[HeaderInput] = (), body: bytes = b"") -> None:
        self.headers: list[HeaderField] = [_field(h) for h in headers]
        self._body = body
        self._cache: dict[str, Any] = {}
        self._start_raw: str | None = None

    # ---- raw header access -------------------------------------------------
    def invalidate(self) -> None:
        """Call after changing self.headers directly (add/set/remove do it themselves)."""
        self._cache.clear()

    def _index(self) -> dict[str, list[HeaderField]]:
        """Fields grouped by canonical key, built once per (unmodified) message."""
        try:
            return self._cache["\0index"]
        except KeyError:
            idx: dict[str, list[HeaderField]] = {}
            for h in self.headers:
                idx.setdefault(h.key, []).append(h)
            self._cache["\0index"] = idx
            return idx

    def field_index(self) -> dict[str, list[HeaderField]]:
        """Fields grouped by canonical key (cached; read it, do not change it)."""
        return self._index()

    def fields(self, name: str) -> list[HeaderField]:
        return list(self._index().get(header_key(name), ()))

    def get(self, name: str) -> str | None:
        """Value of the first field of this header, or None."""
        fs = self._index().get(header_key(name))
        return fs[0].value if fs else None

    def values(self, name: str) -> list[str]:
        """All values, list headers split at top-level commas (in order)."""
        key = header_key(name)
        fs = self._index().get(key, ())
        if key not in LIST_HEADERS:
            return [h.value for h in fs]
        out: list[str] = []
        for h in fs:
            out.extend(split_commas(h.value))
        return out

    def has(self, name: str) -> bool:
        return header_key(name) in self._index()

    def count(self, name: str) -> int:
        return len(self._index().get(header_key(name), ()))

    def add(self, name: str, value: object, *, top: bool = False) -> None:
        """Appends a field (or puts it before the first field of that header when top)."""
        f = HeaderField(name, str(value))
        if top:
            for i, h in enumerate(self.headers):
                if h.key == f.key:
                    self.headers.insert(i, f)
                    break
            else:
                self.headers.append(f)
        else:
            self.headers.append(f)
        self._cache.clear()

    def set(self, name: str, value: object) -> None:
        """Replaces all fields of this header by one, at the first one's position."""
        f = HeaderField(name, str(value))
        for i, h in enumerate(self.headers):
            if h.key == f.key:
                self.headers[i] = f
                self.headers[i + 1:] = [x for x in self.headers[i + 1:] if x.key != f.key]
                break
        else:
            self.headers.append(f)
        self._cache.clear()

    def remove(self, name: str) -> None:
        key = header_key(name)
        self.headers = [h for h in self.headers if h.key != key]
        self._cache.clear()

    def pop_top(self, name: str) -> str | None:
        """Removes and returns the first value of a list header (e.g. the top Via)."""
        key = header_key(name)
        for i, h in enumerate(self.headers):
            if h.key == key:
                parts = split_commas(h.value)
                if len(parts) == 1:
                    del self.headers[i]
                else:
                    self.headers[i] = HeaderField(h.name, ", ".join(parts[1:]))
                self._cache.clear()
                return parts[0]
        return None

    def replace_top(self, name: str, value: object) -> None:
        """Replaces the first value of a list header (e.g. the top Via) where it stands.

        Unlike pop_top() + add(), the parse cache survives: only this header's typed value
        changes, to `value` itself when it is already parsed (a Via, a NameAddr). Every
        request an endpoint receives gets its top Via stamped (received/rport), so nothing
        parsed before the stamp is parsed again after it.
        """
        key = header_key(name)
        for i, h in enumerate(self.headers):
            if h.key == key:
                parts = split_commas(h.value)
                text = str(value)
                new = HeaderField(h.name, text) if len(parts) == 1 else \
                    HeaderField(h.name, ", ".join([text, *parts[1:]]))
                self.headers[i] = new
                idx = self._cache.get("\0index")
                if idx is not None:
                    same = idx[key]
                    same[same.index(h)] = new
                typed = self._cache.pop(key, None)
                if isinstance(typed, list) and typed and not isinstance(value, str):
                    self._cache[key] = [value, *typed[1:]]
                return
        raise ValueError(f"no {name} header field to replace")

    # ---- typed access (parsed lazily, cached) -----------------------------
    def _typed(self, key: str, parse: Any, single: bool = True) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            pass
        if single:
            fields = self._index().get(key, ())
            if not fields:
                value = None
            elif len(fields) > 1:
                raise ValueError(f"multiple {fields[0].name} header fields")
            else:
                value = parse(fields[0].value)
        else:
            value = parse(self.values(key))
        self._cache[key] = value
        return value

    @property
    def vias(self) -> list[Via]:
        return self._typed("via", parse_vias, single=False)

    @property
    def top_via(self) -> Via | None:
        vias = self.vias
        return vias[0] if vias else None

    @property
    def from_(self) -> NameAddr | None:
        return self._typed("from", NameAddr.parse)

    @property
    def to(self) -> NameAddr | None:
        return self._typed("to", NameAddr.parse)

    @property
    def call_id(self) -> str | None:
        return self._typed("call-id", parse_call_id)

    @property
    def cseq(self) -> CSeq | None:
        return self._typed("cseq", CSeq.parse)

    @property
    def max_forwards(self) -> int | None:
        return self._typed("max-forwards", parse_max_forwards)

    @property
    def expires(self) -> int | None:
        return self._typed("expires", parse_delta_seconds)

    @property
    def contacts(self) -> list[NameAddr] | str:
        """Contact values, or STAR ('*')."""
        return self._typed("contact", parse_contacts, single=False)

    @property
    def routes(self) -> list[NameAddr]:
        return self._typed("route", lambda vs: [NameAddr.parse(v) for v in vs], single=False)

    @property
    def record_routes(self) -> list[NameAddr]:
        return self._typed("record-route", lambda vs: [NameAddr.parse(v) for v in vs],
                           single=False)

    @property
    def content_type(self) -> MediaType | None:
        return self._typed("content-type", MediaType.parse)

    @property
    def content_length(self) -> int | None:
        return self._typed("content-length", parse_content_length)

    # ---- body ------------------------------------------------------------
    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, data: bytes) -> None:
        self._body = bytes(data)
        self.set("Content-Length", len(self._body))

    def set_body(self, data: bytes, content_type: str | None) -> None:
        if content_type is not None:
            self.set("Content-Type", content_type)
        self.body = data

    # ---- serialisation ---------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        parts = [self._start_raw if self._start_raw is not None else self.start_line()]
        parts.extend(h.raw if h.raw is not None else f"{h.name}: {h.value}"
                     for h in self.headers)
        # Built messages always carry Content-Length; parsed ones are left as received.
        if self._start_raw is None and not any(h.key == "content-length" for h in self.headers):
            parts.append(f"Content-Length: {len(self._body)}")
        parts.append("")
        parts.append("")
        return "\r\n".join(parts).encode(ENC, ERRS) + self._body

    __bytes__ = serialize

    def _copy_into(self, new: Message) -> None:
        new.headers = list(self.headers)
        new._body = self._body
        new._start_raw = self._start_raw

    def transaction_summary(self) -> str:
        return f"{self.start_line()} (Call-ID {self.get('call-id')}, CSeq {self.get('cseq')})"


class Request(Message):
    __slots__ = ("method", "uri", "version")

    def __init__(self, method: str, uri: Uri | str, headers: Iterable[HeaderInput] = (),
                 body: bytes = b"", *, version: str = "SIP/2.0") -> None:
        if not is_token(method):
            raise ValueError(f"invalid method {method!r}")
        super().__init__(headers, body)
        self.method = method
        self.uri: Uri = parse_uri(uri) if isinstance(uri, str) else uri
        self.version = version

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def set_uri(self, uri: Uri) -> None:
        self.uri = uri
        self._start_raw = None

    def copy(self) -> Request:
        new = Request(self.method, self.uri, version=self.version)
        self._copy_into(new)
        return new

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(Message):
    __slots__ = ("reason", "status", "version")

    def __init__(self, status: int, reason: str | None = None,
                 headers: Iterable[HeaderInput] = (), body: bytes = b"", *,
                 version: str = "SIP/2.0") -> None:
        if not 100 <= status <= 699:
            raise ValueError(f"status code {status} out of range 100-699")
        super().__init__(headers, body)
        self.status = status
        self.reason = REASONS.get(status, "Unknown") if reason is None else reason
        self.version = version

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def copy(self) -> Response:
        new = Response(self.status, self.reason, version=self.version)
        self._copy_into(new)
        return new

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


def _split_header_lines(head: str) -> tuple[str, list[str]]:
    lines = head.split("\r\n")
    start = lines[0]
    fields: list[str] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if not fields:
                raise ValueError("header section starts with a continuation line")
            fields[-1] += "\r\n" + line
        else:
            fields.append(line)
    return start, fields


def _parse_fields(lines: list[str]) -> list[HeaderField]:
    out = []
    for line in lines:
        colon = line.find(":")
        if colon < 0:
            raise ValueError(f"header line without colon: {line[:40]!r}")
        name = line[:colon].rstrip(" \t")
        if name not in _GOOD_NAMES:
            if not _HNAME_RE.match(name):
                raise ValueError(f"invalid header name {name!r}")
            if len(_GOOD_NAMES) < 4096:  # bounded: names come from the network
                _GOOD_NAMES.add(name)
        value = line[colon + 1:]
        if "\r\n" in value:
            value = unfold(value)
        out.append(HeaderField(name, value.strip(" \t"), line))
    return out


def parse_message(data: bytes) -> Request | Response:
    """Parses one message from a UDP datagram (RFC 3261 §18.3 framing)."""
    start_at = 0
    while data[start_at:start_at + 2] == b"\r\n":  # §7.5: ignore leading CRLFs
        start_at += 2
    end = data.find(b"\r\n\r\n", start_at)
    if end < 0:
        raise SipParseError("no empty line after the header section")
    head = data[start_at:end].decode(ENC, ERRS)
    is_request = not head.startswith("SIP/")
    status_bad = 400 if is_request else None
    crlf = head.count("\r\n")  # every CR and LF part of a CRLF: three counts, no regex
    if head.count("\r") != crlf or head.count("\n") != crlf:
        raise SipParseError("bare CR or LF in the header section", None)
    try:
        start, lines = _split_header_lines(head)
        fields = _parse_fields(lines)
    except ValueError as e:
        raise SipParseError(str(e), None, None, is_request) from None
    rest = data[end + 4:]
    cls_fields = [h for h in fields if h.key == "content-length"]
    if len(cls_fields) > 1:
        raise SipParseError("multiple Content-Length header fields", status_bad, fields,
                            is_request)
    if cls_fields:
        try:
            length = parse_content_length(cls_fields[0].value)
        except ValueError as e:
            raise SipParseError(str(e), status_bad, fields, is_request) from None
        if length > len(rest):
            raise SipParseError(
                f"Content-Length {length} exceeds the {len(rest)} octets after the header "
                "section", status_bad, fields, is_request)
        body = rest[:length]
    else:
        body = rest  # UDP: the body runs to the end of the datagram
    msg: Request | Response
    if is_request:
        parts = start.split(" ")
        if len(parts) != 3:
            raise SipParseError(f"malformed Request-Line {start!r}", 400, fields, True)
        method, uri_text, version = parts
        if not is_token(method):
            raise SipParseError(f"invalid method {method!r}", 400, fields, True)
        if not _VERSION_RE.match(version):
            raise SipParseError(f"invalid SIP-Version {version!r}", 400, fields, True)
        try:
            uri = parse_uri(uri_text)
        except ValueError as e:
            raise SipParseError(f"invalid Request-URI: {e}", 400, fields, True) from None
        msg = Request.__new__(Request)
        msg.method, msg.uri, msg.version = method, uri, version
    else:
        m = _STATUS_RE.match(start)
        if m is None:
            raise SipParseError(f"malformed Status-Line {start!r}")
        status = int(m.group(2))
        if not 100 <= status <= 699:
            raise SipParseError(f"status code {status} out of range 100-699")
        msg = Response.__new__(Response)
        msg.status, msg.reason, msg.version = status, m.group(3), "SIP/" + m.group(1)
    msg.headers = fields
    msg._body = body
    msg._cache = {}
    msg._start_raw = start
    return msg


def _copy_fields(request: Message | list[HeaderField], keys: tuple[str, ...]) -> list[HeaderField]:
    fields = request.headers if isinstance(request, Message) else request
    return [h for h in fields if h.key in keys]


def response_to(request: Request, status: int, reason: str | None = None, *,
                to_tag: str | None = None, headers: Iterable[HeaderInput] = (),
                body: bytes = b"", content_type: str | None = None) -> Response:
    """Builds a response per RFC 3261 §8.2.6: Via, From, To, Call-ID, CSeq copied.

    to_tag is added to To when the request's To has none (not for 100 Trying).
    """
    copied: list[HeaderField] = []
    for h in request.headers:
        if h.key in ("via", "from", "call-id", "cseq"):
            copied.append(h)
        elif h.key == "to":
            if to_tag is not None and status != 100:
                try:
                    to = request.to  # parsed once and cached on the request
                    if to is not None and to.tag is None:
                        h = HeaderField(h.name, str(to.with_param("tag", to_tag)))
                except ValueError:
                    pass  # a malformed (or repeated) To is echoed as it came
            copied.append(h)
    resp = Response(status, reason, copied)
    for h in headers:
        resp.headers.append(_field(h))
    if content_type is not None:
        resp.headers.append(HeaderField("Content-Type", content_type))
    resp._body = body
    resp.headers.append(HeaderField("Content-Length", str(len(body))))
    return resp


def error_response(err: SipParseError) -> Response | None:
    """The response owed to an unparseable request, or None when it must be dropped."""
    if err.status is None or not err.is_request or err.headers is None:
        return None
    if not any(h.key == "via" for h in err.headers):
        return None
    fields = _copy_fields(err.headers, ("via", "from", "to", "call-id", "cseq"))
    reason = REASONS.get(err.status, "Bad Request")
    resp = Response(err.status, reason, fields)
    resp.headers.append(HeaderField("Content-Length", "0"))
    return resp


__all__ = [
    "REASONS", "STAR", "HeaderField", "Message", "Request", "Response", "SipParseError",
    "error_response", "parse_message", "response_to",
]
