"""The lab's users, terminals, friendships and servers, and the terminals' PSKs.

Two JSON files (DESIGN §2, "Names" and "Routes and trust"):

`config/lab.json` — who is who::

    {"domain": "m2m.example",
     "users": {"alice": {"terminals": {"a1": ["audio"], "a2": ["audio", "video"]}}, ...},
     "friends": [["alice", "bob"]],
     "servers": {"proxy": "10.0.0.10", "sms": "10.0.0.11", "presence": "10.0.0.12"}}

Friendship is symmetric; a user's own terminals may always reach each other.

`config/credentials.json` — one PSK per terminal, hex: `{"a1": "00112233..."}`. PSKs are kept
as bytes in `Credentials`, whose repr hides them: they reach no log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_CAPS = ("audio", "video")
_SERVERS = ("proxy", "sms", "presence")


class ConfigError(ValueError):
    """A config file is malformed; the message names the file and the offending entry."""


@dataclass(frozen=True)
class Terminal:
    name: str
    user: str
    capabilities: tuple[str, ...]


@dataclass
class LabConfig:
    domain: str
    terminals: dict[str, Terminal]
    users: dict[str, list[str]]
    friends: set[frozenset[str]]
    servers: dict[str, str]
    source: str = "<memory>"

    def aor(self, terminal: str) -> str:
        return f"sip:{terminal}@{self.domain}"

    def terminal_of(self, aor_or_user: str) -> Terminal | None:
        """The terminal for `sip:a1@domain` (or a bare `a1`), None if unknown."""
        user, _, domain = aor_or_user.removeprefix("sip:").partition("@")
        if domain and domain.lower() != self.domain:
            return None
        return self.terminals.get(user)

    def may_contact(self, caller: str, callee: str) -> bool:
        """Friends-only policy between two terminals' users (DESIGN §1, Fig 1)."""
        a, b = self.terminals.get(caller), self.terminals.get(callee)
        if a is None or b is None:
            return False
        return a.user == b.user or frozenset((a.user, b.user)) in self.friends

    @classmethod
    def load(cls, path: Path | str) -> LabConfig:
        path = Path(path)
        return cls.from_dict(_read_json(path), str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> LabConfig:
        def fail(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        if not isinstance(data, dict):
            raise fail("top level must be a JSON object")
        unknown = set(data) - {"domain", "users", "friends", "servers"}
        if unknown:
            raise fail(f"unknown key(s): {', '.join(sorted(unknown))}")
        domain = data.get("domain")
        if not isinstance(domain, str) or not re.fullmatch(r"[a-z0-9.-]+", domain or ""):
            raise fail(f"'domain' must be a lower-case host name, got {domain!r}")
        users_in = data.get("users")
        if not isinstance(users_in, dict) or not users_in:
            raise fail("'users' must be a non-empty object")
        terminals: dict[str, Terminal] = {}
        users: dict[str, list[str]] = {}
        for user, spec in users_in.items():
            if not _NAME_RE.match(user):
                raise fail(f"bad user name {user!r}")
            terms = spec.get("terminals") if isinstance(spec, dict) else None
            if not isinstance(terms, dict) or not terms:
                raise fail(f"user {user!r}: 'terminals' must be a non-empty object")
            users[user] = []
            for term, caps in terms.items():
                if not _NAME_RE.match(term):
                    raise fail(f"user {user!r}: bad terminal name {term!r}")
                if term in terminals:
                    raise fail(f"terminal {term!r} belongs to two users")
                if not isinstance(caps, list) or not caps or any(c not in _CAPS for c in caps):
                    raise fail(f"terminal {term!r}: capabilities must be a non-empty list of "
                               f"{'/'.join(_CAPS)}, got {caps!r}")
                terminals[term] = Terminal(term, user, tuple(caps))
                users[user].append(term)
        friends: set[frozenset[str]] = set()
        for pair in data.get("friends", []):
            if (not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1]
                    or any(p not in users for p in pair)):
                raise fail(f"friends entry {pair!r}: expected two different known users")
            friends.add(frozenset(pair))
        servers = data.get("servers")
        if not isinstance(servers, dict) or set(servers) != set(_SERVERS):
            raise fail(f"'servers' must give exactly {', '.join(_SERVERS)} addresses")
        for name, addr in servers.items():
            if not isinstance(addr, str) or not re.fullmatch(r"\d+\.\d+\.\d+\.\d+", addr):
                raise fail(f"server {name!r}: bad IPv4 address {addr!r}")
        return cls(domain, terminals, users, friends, dict(servers), source)


@dataclass
class Credentials:
    """Per-terminal PSKs. Never printed: repr shows only which terminals have one."""

    _psks: dict[str, bytes] = field(repr=False)

    def psk(self, terminal: str) -> bytes | None:
        return self._psks.get(terminal)

    def __repr__(self) -> str:
        return f"Credentials(terminals={sorted(self._psks)}, psks=<hidden>)"

    @classmethod
    def load(cls, path: Path | str) -> Credentials:
        path = Path(path)
        return cls.from_dict(_read_json(path), str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> Credentials:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a JSON object")
        psks: dict[str, bytes] = {}
        for term, text in data.items():
            # The error names the terminal, never the value: a typo'd key is still a key.
            if not isinstance(text, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2}){16,64}", text):
                raise ConfigError(f"{source}: PSK of {term!r} must be 16 to 64 bytes of hex")
            psks[term] = bytes.fromhex(text)
        return cls(psks)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
