"""RFC 3261 §25 lexical pieces shared by the URI, header and message parsers.

Everything here works on header text that has already been unfolded (folding
CRLF + whitespace replaced by one SP), decoded with utf-8/surrogateescape so that
arbitrary octets survive a round trip.
"""

from __future__ import annotations

import re

TOKEN_CHARS = r"A-Za-z0-9\-.!%*_+`'~"
TOKEN = f"[{TOKEN_CHARS}]+"
TOKEN_RE = re.compile(f"{TOKEN}\\Z")
# qdtext excludes raw controls except HTAB; quoted-pair is "\" + any octet but CR/LF.
QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*"'
QUOTED_RE = re.compile(QUOTED)
WS = "[ \t]*"
# gen-value = token / host / quoted-string; host adds ":" "[" "]" for IPv6 references.
GEN_VALUE = f'(?:{QUOTED}|[{TOKEN_CHARS}:\\[\\]]+)'
PARAM_RE = re.compile(f"{WS};{WS}({TOKEN})(?:{WS}={WS}({GEN_VALUE}))?")
TRAILING_WS_RE = re.compile(f"{WS}\\Z")
HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)\Z")
IPV4_RE = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}\Z")
FOLD_RE = re.compile(r"\r\n[ \t]+")


def is_token(text: str) -> bool:
    return TOKEN_RE.match(text) is not None


def unfold(text: str) -> str:
    """Replaces each fold (CRLF followed by whitespace) with a single SP (§7.3.1)."""
    return FOLD_RE.sub(" ", text) if "\r\n" in text else text


def unquote(quoted: str) -> str:
    """'"a\\"b"' -> 'a"b' (quoted-pair expansion)."""
    inner = quoted[1:-1]
    if "\\" not in inner:
        return inner
    return re.sub(r"\\(.)", r"\1", inner, flags=re.S)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Params:
    """Ordered header/URI parameters; names compare case-insensitively, values kept raw."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[str, str | None]] | None = None) -> None:
        self.items: list[tuple[str, str | None]] = items if items is not None else []

    def _find(self, name: str) -> int:
        items = self.items
        for i in range(len(items)):  # fast path: the usual exact-case match
            if items[i][0] == name:
                return i
        lname = name.lower()
        for i in range(len(items)):
            if items[i][0].lower() == lname:
                return i
        return -1

    def __contains__(self, name: str) -> bool:
        return self._find(name) >= 0

    def get(self, name: str, default: str | None = None) -> str | None:
        i = self._find(name)
        return default if i < 0 else self.items[i][1]

    def set(self, name: str, value: str | None) -> None:
        i = self._find(name)
        if i < 0:
            self.items.append((name, value))
        else:
            self.items[i] = (self.items[i][0], value)

    def remove(self, name: str) -> None:
        i = self._find(name)
        if i >= 0:
            del self.items[i]

    def copy(self) -> Params:
        return Params(list(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Params):
            return NotImplemented
        return [(n.lower(), v) for n, v in self.items] == [(n.lower(), v) for n, v in other.items]

    def __str__(self) -> str:
        return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in self.items)

    def __repr__(self) -> str:
        return f"Params({self.items!r})"


def parse_params(text: str, pos: int, what: str) -> Params:
    """Parses *( SEMI generic-param ) from text[pos:] to the end of the string."""
    items: list[tuple[str, str | None]] = []
    end = len(text)
    while pos < end:
        m = PARAM_RE.match(text, pos)
        if m is None:
            if TRAILING_WS_RE.match(text, pos):
                break
            raise ValueError(f"invalid {what} parameter at {text[pos:pos + 20]!r}")
        items.append((m.group(1), m.group(2)))
        pos = m.end()
    return Params(items)


def split_commas(value: str) -> list[str]:
    """Splits a header value at top-level commas (not inside quotes or <>)."""
    if "," not in value:
        return [value.strip(" \t")]
    parts: list[str] = []
    start = 0
    in_quote = in_angle = False
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if in_quote:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == "<":
            in_angle = True
        elif c == ">":
            in_angle = False
        elif c == "," and not in_angle:
            parts.append(value[start:i].strip(" \t"))
            start = i + 1
        i += 1
    parts.append(value[start:].strip(" \t"))
    return parts
