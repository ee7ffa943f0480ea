"""multipart/* bodies (RFC 2046 §5.1): split into parts whose octets stay untouched."""

from __future__ import annotations

from dataclasses import dataclass, field

from nodes.sip.headers import MediaType


@dataclass
class Part:
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def content_type(self) -> str | None:
        for name, value in self.headers:
            if name.lower() in ("content-type", "c"):
                return MediaType.parse(value).mime
        return None


def parse_multipart(body: bytes, content_type: MediaType) -> list[Part]:
    """Parts of a multipart body; a part's octets are exactly those between delimiters."""
    boundary = content_type.param("boundary")
    if not boundary:
        raise ValueError("multipart body without boundary parameter")
    delim = b"--" + boundary.encode()
    if body.startswith(delim):
        pos = 0
    else:
        pos = body.find(b"\r\n" + delim)
        if pos < 0:
            raise ValueError("multipart body has no opening delimiter")
        pos += 2
    parts: list[Part] = []
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise ValueError("multipart delimiter line not terminated")
        if body[pos + len(delim):pos + len(delim) + 2] == b"--":
            return parts
        nxt = body.find(b"\r\n" + delim, line_end)
        if nxt < 0:
            raise ValueError("multipart body has no closing delimiter")
        parts.append(_parse_part(body[line_end + 2:nxt]))
        pos = nxt + 2


def _parse_part(raw: bytes) -> Part:
    if raw.startswith(b"\r\n"):
        return Part([], raw[2:])
    sep = raw.find(b"\r\n\r\n")
    if sep < 0:
        raise ValueError("multipart part without header/body separator")
    headers = []
    for line in raw[:sep].decode("utf-8", "surrogateescape").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"malformed part header {line[:40]!r}")
        headers.append((name.strip(), value.strip()))
    return Part(headers, raw[sep + 4:])


def build_multipart(parts: list[Part], boundary: str) -> bytes:
    out = b""
    for p in parts:
        out += b"--" + boundary.encode() + b"\r\n"
        out += b"".join(f"{n}: {v}\r\n".encode() for n, v in p.headers) + b"\r\n" + p.body
        out += b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"
