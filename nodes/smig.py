"""SMIG messages: one JSON object per SIP MESSAGE, `Content-Type: application/smig+json`.

Every message has a `type` and `session` (the original Call-ID, DESIGN §2). One typed class
per type; `parse()` checks the type, the fields and their JSON types (unknown or missing
fields are errors with precise messages) and `serialize()` writes compact, sorted JSON.
Key material (`keys`, `security`) never shows in a repr.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from nodes.jsonin import loads

CONTENT_TYPE = "application/smig+json"
MEDIA_KINDS = ("audio", "video")
METHODS = ("reuse", "renegotiate")
REKEY_PHASES = ("offer", "answer", "commit", "done")
_SECRET_FIELDS = ("keys", "security")


@dataclass(frozen=True)
class Smig:
    TYPE: ClassVar[str] = ""
    session: str

    def serialize(self) -> bytes:
        body = {"type": self.TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                body[f.name.replace("_", "-")] = value
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}=<hidden>" if f.name in _SECRET_FIELDS and getattr(self, f.name)
            else f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({shown})"

    __str__ = __repr__

    def check(self) -> None:
        """Value checks beyond JSON types (subclasses add theirs)."""
        if not self.session:
            raise ValueError(f"{self.TYPE}: empty session")


# -- proxy -> servers -----------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class SessionEstablished(Smig):
    TYPE: ClassVar[str] = "session-established"
    caller: str
    callee: str


@dataclass(frozen=True, repr=False)
class Registration(Smig):
    """A terminal (un)registered (proxy -> SMS and presence); `session`: its Call-ID."""

    TYPE: ClassVar[str] = "registration"
    terminal: str
    registered: bool
    address: str | None = None  # the contact's IP

    def check(self) -> None:
        super().check()
        if self.address is not None:
            _ipv4(self.TYPE, "address", self.address)


# -- Fig 3 ------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class SwitchRequest(Smig):
    """Step (1) from the initiator (with security and keys); step (2) to the peer (without)."""

    TYPE: ClassVar[str] = "switch-request"
    new_terminal: str
    media: str
    method: str = "reuse"
    from_terminal: str | None = None
    security: dict[str, Any] | None = None
    keys: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        _one_of(self.TYPE, "media", self.media, MEDIA_KINDS)
        _one_of(self.TYPE, "method", self.method, METHODS)
        _check_secrets(self.TYPE, self.security, self.keys)

    def stripped(self) -> SwitchRequest:
        """Step (2): what the peer gets — no security information, no keys."""
        return dataclasses.replace(self, security=None, keys=None)


@dataclass(frozen=True, repr=False)
class SwitchResponse(Smig):
    """Step (3): the peer agrees (naming its new terminal, with its security and keys)."""

    TYPE: ClassVar[str] = "switch-response"
    accept: bool
    new_terminal: str | None = None
    reason: str | None = None
    security: dict[str, Any] | None = None
    keys: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        _check_secrets(self.TYPE, self.security, self.keys)


@dataclass(frozen=True, repr=False)
class SwitchRefused(Smig):
    TYPE: ClassVar[str] = "switch-refused"
    reason: str


@dataclass(frozen=True, repr=False)
class SessionConfig(Smig):
    """Step (5): media, where to send, security information and keys (or none: negotiate)."""

    TYPE: ClassVar[str] = "session-config"
    terminal: str  # the terminal this config is for
    media: str
    role: str  # "offerer" or "answerer" in the media-key derivation
    local_port: int
    peer_terminal: str
    peer_address: str
    peer_port: int
    method: str = "reuse"
    security: dict[str, Any] | None = None
    keys: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        _one_of(self.TYPE, "media", self.media, MEDIA_KINDS)
        _one_of(self.TYPE, "role", self.role, ("offerer", "answerer"))
        _one_of(self.TYPE, "method", self.method, METHODS)
        for name in ("local_port", "peer_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65534:
                raise ValueError(f"{self.TYPE}: {name.replace('_', '-')} {port} out of range")
        _ipv4(self.TYPE, "peer-address", self.peer_address)
        _check_secrets(self.TYPE, self.security, self.keys)


@dataclass(frozen=True, repr=False)
class SwitchComplete(Smig):
    """Step (7)."""

    TYPE: ClassVar[str] = "switch-complete"
    terminal: str


@dataclass(frozen=True, repr=False)
class SwitchDone(Smig):
    """All new terminals completed: the old ones end their dialog, the SMS anchors."""

    TYPE: ClassVar[str] = "switch-done"
    terminals: list[str]


@dataclass(frozen=True, repr=False)
class Rekey(Smig):
    """Step (9), and the key negotiation of the renegotiate-first baseline."""

    TYPE: ClassVar[str] = "rekey"
    phase: str
    terminal: str
    key: str | None = None  # the sender's fresh m2m-key attribute value (offer/answer)
    purpose: str = "rekey"

    def check(self) -> None:
        super().check()
        _one_of(self.TYPE, "phase", self.phase, REKEY_PHASES)
        _one_of(self.TYPE, "purpose", self.purpose, ("rekey", "negotiate"))
        if self.phase in ("offer", "answer") and not self.key:
            raise ValueError(f"rekey {self.phase}: missing key")


@dataclass(frozen=True, repr=False)
class End(Smig):
    TYPE: ClassVar[str] = "end"
    reason: str | None = None


# -- Fig 4 ------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class LinkSwitch(Smig):
    """A terminal now has `address` (a new interface) for this session: from the proxy right
    after the link-switch REGISTER (the proposal), or from the terminal itself (baseline B1)."""

    TYPE: ClassVar[str] = "link-switch"
    terminal: str
    address: str

    def check(self) -> None:
        super().check()
        _ipv4(self.TYPE, "address", self.address)


@dataclass(frozen=True, repr=False)
class LinkConfig(Smig):
    """Session configuration for a link switch: same terminals, same keys; `terminal`
    moves from `old_address` to `address`."""

    TYPE: ClassVar[str] = "link-config"
    terminal: str
    address: str
    old_address: str

    def check(self) -> None:
        super().check()
        _ipv4(self.TYPE, "address", self.address)
        _ipv4(self.TYPE, "old-address", self.old_address)


def parse_link_switch_body(data: bytes) -> list[str]:
    """The body of a link-switch REGISTER: {"type": "link-switch", "sessions": [...]}."""
    body = loads(data, "link-switch body")
    if not isinstance(body, dict) or body.get("type") != "link-switch":
        raise ValueError('link-switch body must be {"type": "link-switch", "sessions": [...]}')
    unknown = sorted(set(body) - {"type", "sessions"})
    if unknown:
        raise ValueError(f"link-switch: unknown field(s) {_names(unknown)}")
    sessions = body.get("sessions")
    if (not isinstance(sessions, list) or not sessions
            or not all(isinstance(s, str) and s for s in sessions)):
        raise ValueError("link-switch: 'sessions' must be a non-empty array of Call-IDs")
    return sessions


def link_switch_body(sessions: list[str]) -> bytes:
    return json.dumps({"type": "link-switch", "sessions": sessions},
                      separators=(",", ":")).encode()


# -- presence -------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class PresenceQuery(Smig):
    """`session` carries the query id here."""

    TYPE: ClassVar[str] = "presence-query"
    user: str
    capability: str

    def check(self) -> None:
        super().check()
        _one_of(self.TYPE, "capability", self.capability, MEDIA_KINDS)


@dataclass(frozen=True, repr=False)
class PresenceResult(Smig):
    TYPE: ClassVar[str] = "presence-result"
    user: str
    terminals: list[dict[str, Any]]


TYPES: dict[str, type[Smig]] = {
    cls.TYPE: cls for cls in (SessionEstablished, Registration, SwitchRequest, SwitchResponse,
                              SwitchRefused, SessionConfig, SwitchComplete, SwitchDone, Rekey,
                              End, LinkSwitch, LinkConfig, PresenceQuery, PresenceResult)
}


def _one_of(kind: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{kind}: {name} {value!r} not one of {', '.join(allowed)}")


def _ipv4(kind: str, name: str, value: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{kind}: {name} {value[:40]!r} is not an IPv4 address") from None


_SECURITY_FIELDS = ("answer", "offer")
_KEY_DIRECTIONS = ("answer-to-offer", "offer-to-answer")
_KEY_PARTS = ("auth", "enc")


def _check_secrets(kind: str, security: dict[str, Any] | None,
                   keys: dict[str, Any] | None) -> None:
    """The shape `MediaSession.export()` gives them (DESIGN §2, Fig 3 steps 1 and 3):
    security {"offer": m2m-key, "answer": m2m-key}; keys {"offer-to-answer": {"enc": hex,
    "auth": hex}, "answer-to-offer": {...}}. Errors name the field, never its value."""
    if security is not None and (
            sorted(security) != list(_SECURITY_FIELDS)
            or not all(isinstance(v, str) and v for v in security.values())):
        raise ValueError(f"{kind}: security must be {{\"offer\": string, \"answer\": string}}")
    if keys is None:
        return
    if sorted(keys) != list(_KEY_DIRECTIONS):
        raise ValueError(f"{kind}: keys must have exactly {' and '.join(_KEY_DIRECTIONS)}")
    for direction in _KEY_DIRECTIONS:
        pair = keys[direction]
        if not isinstance(pair, dict) or sorted(pair) != list(_KEY_PARTS):
            raise ValueError(f"{kind}: keys.{direction} must have exactly enc and auth")
        for part in _KEY_PARTS:
            if not _is_hex(pair[part]):
                raise ValueError(f"{kind}: keys.{direction}.{part} must be a hex string")


def _is_hex(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def _names(names: list[str]) -> str:
    """Field names from the wire, printable: plain when they are simple, quoted otherwise."""
    return ", ".join(n if n.replace("-", "").replace("_", "").isalnum() and n.isascii()
                     else repr(n[:40]) for n in names)


def _json_type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if isinstance(hint, types.UnionType):
        return any(_json_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if not isinstance(value, origin):
        return False
    args = typing.get_args(hint)
    if origin is list and args:
        return all(_json_type_ok(v, args[0]) for v in value)
    if origin is dict and args:
        return all(_json_type_ok(v, args[1]) for v in value.values())
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin is list and args and args[0] is not Any:
        return f"array of {_type_name(args[0])}"
    return {str: "string", int: "integer", bool: "boolean", dict: "object", list: "array",
            type(None): "null"}.get(origin, str(origin))


def parse(data: bytes) -> Smig:
    """One SMIG message from a MESSAGE body; ValueError says precisely what is wrong."""
    body = loads(data, "SMIG body")
    if not isinstance(body, dict):
        raise ValueError("SMIG body must be a JSON object")
    kind = body.get("type")
    cls = TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown SMIG type {kind!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    wire = {name.replace("_", "-"): name for name in fields}
    unknown = sorted(set(body) - set(wire) - {"type"})
    if unknown:
        raise ValueError(f"{kind}: unknown field(s) {_names(unknown)}")
    args: dict[str, Any] = {}
    for wname, name in wire.items():
        f = fields[name]
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        if wname not in body:
            if required:
                raise ValueError(f"{kind}: missing field {wname!r}")
            continue
        if not _json_type_ok(body[wname], hints[name]):
            raise ValueError(f"{kind}: field {wname!r} must be {_type_name(hints[name])}")
        args[name] = body[wname]
    msg = cls(**args)
    msg.check()
    return msg
