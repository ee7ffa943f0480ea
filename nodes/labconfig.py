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

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.jsonin import JsonError, loads

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

    def require_terminal(self, name: str) -> Terminal:
        """The terminal called `name`; ConfigError naming the known ones if there is none."""
        term = self.terminals.get(name)
        if term is None:
            raise ConfigError(f"{self.source}: no terminal {name!r} (terminals: "
                              f"{', '.join(sorted(self.terminals))})")
        return term

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
            if set(spec) != {"terminals"}:
                raise fail(f"user {user!r}: unknown key(s): "
                           f"{', '.join(sorted(set(spec) - {'terminals'}))}")
            users[user] = []
            for term, caps in terms.items():
                if not _NAME_RE.match(term):
                    raise fail(f"user {user!r}: bad terminal name {term!r}")
                if term in _SERVERS:  # sip:proxy@ and friends are the servers' own names
                    raise fail(f"user {user!r}: terminal name {term!r} is a server's name")
                if term in terminals:
                    raise fail(f"terminal {term!r} belongs to two users")
                if not isinstance(caps, list) or not caps or any(c not in _CAPS for c in caps):
                    raise fail(f"terminal {term!r}: capabilities must be a non-empty list of "
                               f"{'/'.join(_CAPS)}, got {caps!r}")
                terminals[term] = Terminal(term, user, tuple(caps))
                users[user].append(term)
        friends: set[frozenset[str]] = set()
        pairs = data.get("friends", [])
        if not isinstance(pairs, list):
            raise fail(f"'friends' must be a list of [user, user] pairs, got {pairs!r}")
        for pair in pairs:
            if (not isinstance(pair, list) or len(pair) != 2
                    or not all(isinstance(p, str) and p in users for p in pair)
                    or pair[0] == pair[1]):
                raise fail(f"friends entry {pair!r}: expected two different known users")
            friends.add(frozenset(pair))
        servers = data.get("servers")
        if not isinstance(servers, dict) or set(servers) != set(_SERVERS):
            raise fail(f"'servers' must give exactly {', '.join(_SERVERS)} addresses")
        for name, addr in servers.items():
            if not _is_ipv4(addr):
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


def _is_ipv4(addr: Any) -> bool:
    """Dotted-quad IPv4 (each part 0..255; no host names, no shorthand like `10.1`)."""
    if not isinstance(addr, str) or not re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", addr):
        return False
    try:
        ipaddress.IPv4Address(addr)
    except ValueError:
        return False
    return True


def _read_json(path: Path) -> Any:
    try:
        return loads(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except JsonError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc.detail}") from None
