"""SDP session descriptions (RFC 4566 / RFC 8866) with byte-exact round trips.

Lines are kept as written (type, value, line ending); typed views cover what the lab
needs: o=, c= at session and media level, m= lines and a= attributes (split at the
first colon; attributes the module does not know stay exactly as they were).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE_RE = re.compile(r"([a-z])=(.*)\Z", re.S)


@dataclass(frozen=True)
class Connection:
    nettype: str
    addrtype: str
    address: str

    @classmethod
    def parse(cls, value: str) -> Connection:
        parts = value.split(" ")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"malformed SDP c= line {value!r}")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass
class Line:
    type: str
    value: str
    eol: str = "\r\n"

    def __str__(self) -> str:
        return f"{self.type}={self.value}{self.eol}"


def _attr_split(value: str) -> tuple[str, str | None]:
    name, colon, rest = value.partition(":")
    return name, rest if colon else None


@dataclass
class _Section:
    lines: list[Line] = field(default_factory=list)

    def attributes(self, name: str) -> list[str | None]:
        """Values of a=name lines (None for a property attribute like a=sendrecv)."""
        out = []
        for ln in self.lines:
            if ln.type == "a":
                n, v = _attr_split(ln.value)
                if n == name:
                    out.append(v)
        return out

    def attribute(self, name: str) -> str | None:
        vals = self.attributes(name)
        return vals[0] if vals else None

    def has_attribute(self, name: str) -> bool:
        return any(ln.type == "a" and _attr_split(ln.value)[0] == name for ln in self.lines)

    def add_attribute(self, name: str, value: str | None = None) -> None:
        self.lines.append(Line("a", name if value is None else f"{name}:{value}"))

    def remove_attributes(self, name: str) -> None:
        self.lines = [ln for ln in self.lines
                      if not (ln.type == "a" and _attr_split(ln.value)[0] == name)]

    @property
    def connection(self) -> Connection | None:
        for ln in self.lines:
            if ln.type == "c":
                return Connection.parse(ln.value)
        return None

    def set_connection(self, conn: Connection) -> None:
        for ln in self.lines:
            if ln.type == "c":
                ln.value = str(conn)
                return
        # c= goes before t=/m=-level attributes; after i=/u=/e=/p= is fine for the lab.
        pos = next((i for i, ln in enumerate(self.lines) if ln.type in "btzkam"), len(self.lines))
        self.lines.insert(max(pos, 1), Line("c", str(conn)))


@dataclass
class Media(_Section):
    """One m= section; lines[0] is the m= line itself."""

    @property
    def _m(self) -> list[str]:
        return self.lines[0].value.split(" ")

    @property
    def media(self) -> str:
        return self._m[0]

    @property
    def port(self) -> int:
        return int(self._m[1].split("/")[0])

    @port.setter
    def port(self, value: int) -> None:
        m = self._m
        rest = m[1].partition("/")
        m[1] = str(value) + (rest[1] + rest[2])
        self.lines[0].value = " ".join(m)

    @property
    def proto(self) -> str:
        return self._m[2]

    @property
    def formats(self) -> list[str]:
        return self._m[3:]


@dataclass
class SessionDescription(_Section):
    media: list[Media] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | str) -> SessionDescription:
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        sd = cls()
        current: _Section = sd
        pos = 0
        n = len(text)
        first = True
        while pos < n:
            end = text.find("\n", pos)
            if end < 0:
                raw, eol, pos = text[pos:], "", n
            else:
                nl = end + 1
                raw, eol = (text[pos:end - 1], "\r\n") if end > pos and text[end - 1] == "\r" \
                    else (text[pos:end], "\n")
                pos = nl
            m = _LINE_RE.match(raw)
            if m is None:
                raise ValueError(f"invalid SDP line {raw!r}")
            line = Line(m.group(1), m.group(2), eol)
            if first and line.type != "v":
                raise ValueError("SDP must start with v=")
            first = False
            if line.type == "m":
                if len(line.value.split(" ")) < 4 or not line.value.split(" ")[1] \
                        .split("/")[0].isdigit():
                    raise ValueError(f"malformed SDP m= line {line.value!r}")
                current = Media([line])
                sd.media.append(current)  # type: ignore[arg-type]
            else:
                current.lines.append(line)
        if first:
            raise ValueError("empty SDP")
        return sd

    @property
    def origin(self) -> list[str]:
        for ln in self.lines:
            if ln.type == "o":
                parts = ln.value.split(" ")
                if len(parts) != 6:
                    raise ValueError(f"malformed SDP o= line {ln.value!r}")
                return parts
        raise ValueError("SDP without o= line")

    def media_connection(self, index: int) -> Connection | None:
        """The c= that applies to media section 'index' (media level, else session)."""
        return self.media[index].connection or self.connection

    def serialize(self) -> bytes:
        out = "".join(str(ln) for ln in self.lines)
        for m in self.media:
            out += "".join(str(ln) for ln in m.lines)
        return out.encode("utf-8", "surrogateescape")

    __bytes__ = serialize
