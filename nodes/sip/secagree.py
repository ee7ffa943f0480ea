"""RFC 3329 security agreement: Security-Client / -Server / -Verify with the TS 33.203 Annex H
parameters of the lab's `ipsec-m2ms` mechanism (DESIGN §2), negotiation, downgrade check.

    sec-mechanism = mechanism-name *(SEMI mech-parameters)          (RFC 3329 §2.2)
    ipsec-m2ms;alg=hmac-sha-256-128;ealg=aes-cbc;prot=esp;mod=trans;
        spi-c=1111;spi-s=2222;port-c=5062;port-s=5064[;q=0.5]

ipsec-m2ms requires alg, ealg, spi-c, spi-s (256..2^32-1), port-c, port-s (1..65535); prot and
mod default to esp and trans as in TS 33.203. Values the lab does not implement (alg=hmac-md5-96,
mod=tun, ...) make a mechanism unsupported, not malformed: a UA lists one entry per algorithm
and the peer picks. Other mechanisms (`digest`, `tls`, `ipsec-ike`, `ipsec-3gpp`, ...) parse
generically; unknown parameters are kept.

Malformed text raises ValueError (a UA/proxy answers 400); a well-formed offer with nothing
acceptable raises `SecAgreeError` (494); a Security-Verify that differs from the
Security-Server sent raises `SecurityVerifyMismatch` (a downgrade attempt, also 494).

The second half derives the registration keys (HKDF-SHA-256 from the PSK and the Digest
nonce) and lays out the four transport-mode ESP SAs and their policies, for either side.
Keys are kept in objects whose repr hides them.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from nodes.ipsec.api import (
    AUTH_ALGS,
    ENC_ALGS,
    IPPROTO_UDP,
    Direction,
    Policy,
    SecurityAssociation,
    Selector,
)
from nodes.mediakeys import SPI_MAX, SPI_MIN, KeyPair, hkdf_sha256, new_spi
from nodes.sip.grammar import TOKEN, Params, parse_params, split_commas, unquote

IPSEC_M2MS = "ipsec-m2ms"
# Mechanisms that carry the Annex H parameters (spi/port values are checked for both).
ANNEX_H_MECHANISMS = frozenset({IPSEC_M2MS, "ipsec-3gpp"})
REQUIRED_M2MS = ("alg", "ealg", "spi-c", "spi-s", "port-c", "port-s")
_NUMERIC = {"spi-c": (SPI_MIN, SPI_MAX), "spi-s": (SPI_MIN, SPI_MAX),
            "port-c": (1, 65535), "port-s": (1, 65535)}
_NAME_RE = re.compile(f"[ \t]*({TOKEN})")
_QVALUE_RE = re.compile(r"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\Z")  # RFC 3261 qvalue
_DIGITS_RE = re.compile(r"[0-9]+\Z")
# Serialisation order of the typed parameters (the order Kamailio and TS 33.203 use).
_ORDER = ("alg", "ealg", "prot", "mod", "spi-c", "spi-s", "port-c", "port-s")


class SecAgreeError(Exception):
    """No acceptable security mechanism: answer `494 Security Agreement Required`."""

    status = 494
    reason = "Security Agreement Required"


class SecurityVerifyMismatch(SecAgreeError):
    """Security-Verify differs from the Security-Server that was sent: a downgrade attempt."""


def _check_number(mech: str, name: str, value: str | None, what: str) -> int:
    lo, hi = _NUMERIC[name]
    if value is None or not _DIGITS_RE.match(value):
        raise ValueError(f"{what} {mech}: {name} {value!r} is not a decimal number")
    if len(value) > 10:  # also keeps int() away from huge digit strings
        raise ValueError(f"{what} {mech}: {name} {value[:12]}... out of range ({lo}..{hi})")
    n = int(value)
    if not lo <= n <= hi:
        raise ValueError(f"{what} {mech}: {name} {n} out of range ({lo}..{hi})")
    return n


def _validate(name: str, params: Params, what: str) -> None:
    mech = name.lower()
    seen: set[str] = set()
    for pname, value in params.items:
        low = pname.lower()
        if low in seen:
            raise ValueError(f"{what} {name}: duplicate parameter {low!r}")
        seen.add(low)
        if low == "q" and (value is None or not _QVALUE_RE.match(value)):
            raise ValueError(f"{what} {name}: q {value!r} is not a qvalue (0..1, 3 decimals)")
        if mech in ANNEX_H_MECHANISMS and low in _NUMERIC:
            _check_number(name, low, value, what)
    if mech == IPSEC_M2MS:
        for req in REQUIRED_M2MS:
            if req not in seen:
                raise ValueError(f"{what} {name}: missing required parameter {req!r}")
            if params.get(req) is None:
                raise ValueError(f"{what} {name}: parameter {req!r} has no value")
        for a, b in (("spi-c", "spi-s"), ("port-c", "port-s")):
            if int(params.get(a) or 0) == int(params.get(b) or 0):
                raise ValueError(f"{what} {name}: {a} and {b} must differ "
                                 f"(both {int(params.get(a) or 0)})")


def _norm_value(pname: str, value: str | None) -> str | None:
    """A parameter value as compared by the downgrade check (case/whitespace-insensitive)."""
    if value is None:
        return None
    if value.startswith('"'):
        return unquote(value)
    if pname == "q":
        return str(Decimal(value).normalize())
    if pname in _NUMERIC and value.isdigit():
        return str(int(value))
    return value.lower()


class SecurityMechanism:
    """One sec-mechanism. Parsed ones serialise to their original text (stripped)."""

    __slots__ = ("_raw", "name", "params")

    def __init__(self, name: str, params: Params | Iterable[tuple[str, str | None]] = (),
                 *, what: str = "security mechanism") -> None:
        self.name = name
        self.params = params if isinstance(params, Params) else Params(list(params))
        _validate(name, self.params, what)
        self._raw: str | None = None

    @classmethod
    def parse(cls, text: str, what: str = "Security-Client") -> SecurityMechanism:
        m = _NAME_RE.match(text)
        if m is None:
            if not text.strip(" \t"):
                raise ValueError(f"{what}: empty mechanism")
            raise ValueError(f"{what}: invalid mechanism name at {text.strip()[:20]!r}")
        params = parse_params(text, m.end(), what)
        mech = cls(m.group(1), params, what=what)
        mech._raw = text.strip(" \t")
        return mech

    @classmethod
    def ipsec(cls, alg: str, ealg: str, spi_c: int, spi_s: int, port_c: int, port_s: int,
              q: str | None = None, name: str = IPSEC_M2MS) -> SecurityMechanism:
        values = {"alg": alg, "ealg": ealg, "prot": "esp", "mod": "trans", "spi-c": str(spi_c),
                  "spi-s": str(spi_s), "port-c": str(port_c), "port-s": str(port_s)}
        items: list[tuple[str, str | None]] = [(k, values[k]) for k in _ORDER]
        if q is not None:
            items.append(("q", q))
        return cls(name, items)

    # ---- typed views -------------------------------------------------------------------
    @property
    def mechanism(self) -> str:
        return self.name.lower()

    def _str(self, name: str, default: str | None = None) -> str | None:
        v = self.params.get(name)
        return default if v is None else v.lower()

    @property
    def q(self) -> Decimal | None:
        v = self.params.get("q")
        return None if v is None else Decimal(v)

    @property
    def alg(self) -> str | None:
        return self._str("alg")

    @property
    def ealg(self) -> str | None:
        return self._str("ealg")

    @property
    def prot(self) -> str:
        return self._str("prot", "esp") or "esp"  # TS 33.203 default

    @property
    def mod(self) -> str:
        return self._str("mod", "trans") or "trans"  # TS 33.203 default

    def _int(self, name: str) -> int:
        v = self.params.get(name)
        if v is None:
            raise ValueError(f"{self.name}: no {name} parameter")
        return int(v)

    @property
    def spi_c(self) -> int:
        return self._int("spi-c")

    @property
    def spi_s(self) -> int:
        return self._int("spi-s")

    @property
    def port_c(self) -> int:
        return self._int("port-c")

    @property
    def port_s(self) -> int:
        return self._int("port-s")

    def unsupported_reason(self) -> str | None:
        """Why the lab cannot use this mechanism (None: usable ipsec-m2ms)."""
        if self.mechanism != IPSEC_M2MS:
            return f"mechanism {self.name!r} not supported"
        if self.alg not in AUTH_ALGS:
            return f"alg {self.alg!r} not supported"
        if self.ealg not in ENC_ALGS:
            return f"ealg {self.ealg!r} not supported"
        if self.prot != "esp":
            return f"prot {self.prot!r} not supported (esp only)"
        if self.mod != "trans":
            return f"mod {self.mod!r} not supported (trans only)"
        return None

    def canonical(self) -> tuple[str, tuple[tuple[str, str | None], ...]]:
        """Name and parameters normalised: what Security-Verify is compared on."""
        items = sorted((n.lower(), _norm_value(n.lower(), v)) for n, v in self.params.items)
        return self.mechanism, tuple(items)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecurityMechanism):
            return NotImplemented
        return self.canonical() == other.canonical()

    def __hash__(self) -> int:
        return hash(self.canonical())

    def serialize(self) -> str:
        return self._raw if self._raw is not None else f"{self.name}{self.params}"

    __str__ = serialize

    def __repr__(self) -> str:
        return f"SecurityMechanism({self.serialize()!r})"


def parse_mechanisms(values: Iterable[str],
                     what: str = "Security-Client") -> list[SecurityMechanism]:
    """All mechanisms of one header (every field value, each possibly comma-separated)."""
    out: list[SecurityMechanism] = []
    for value in values:
        for part in split_commas(value):
            out.append(SecurityMechanism.parse(part, what))
    if not out:
        raise ValueError(f"{what}: no mechanism")
    return out


def serialize_mechanisms(mechs: Sequence[SecurityMechanism]) -> str:
    """One header field value listing `mechs` comma-separated."""
    return ", ".join(m.serialize() for m in mechs)


@dataclass(frozen=True)
class Suite:
    """One acceptable mechanism/algorithm combination, for preference lists. Mechanisms other
    than ipsec-m2ms (`Suite.named("tls")`) match on their name alone."""

    alg: str | None = "hmac-sha-256-128"
    ealg: str | None = "aes-cbc"
    mechanism: str = IPSEC_M2MS

    @classmethod
    def named(cls, mechanism: str) -> Suite:
        return cls(None, None, mechanism.lower())

    def matches(self, mech: SecurityMechanism) -> bool:
        if mech.mechanism != self.mechanism:
            return False
        if self.mechanism != IPSEC_M2MS:
            return True
        return (mech.unsupported_reason() is None and mech.alg == self.alg
                and mech.ealg == self.ealg)


# The lab's default preference order: strongest first.
DEFAULT_SUITES = (
    Suite("hmac-sha-256-128", "aes-cbc"),
    Suite("hmac-sha-1-96", "aes-cbc"),
    Suite("hmac-sha-256-128", "null"),
    Suite("hmac-sha-1-96", "null"),
)


def offer(spi_c: int, spi_s: int, port_c: int, port_s: int,
          suites: Sequence[Suite] = DEFAULT_SUITES,
          q: Sequence[str] | None = None) -> list[SecurityMechanism]:
    """One ipsec-m2ms mechanism per suite, all with the same SPIs and ports (as TS 33.203 UEs
    list their algorithms); `q` gives each one's preference if wanted."""
    if q is not None and len(q) != len(suites):
        raise ValueError(f"{len(q)} q values for {len(suites)} suites")
    out = []
    for i, s in enumerate(suites):
        if s.alg is None or s.ealg is None:
            raise ValueError(f"suite {s.mechanism!r} has no ipsec algorithms")
        out.append(SecurityMechanism.ipsec(s.alg, s.ealg, spi_c, spi_s, port_c, port_s,
                                           None if q is None else q[i], s.mechanism))
    return out


def choose_mechanism(offered: Sequence[SecurityMechanism],
                     preferences: Sequence[Suite] = DEFAULT_SUITES) -> SecurityMechanism:
    """The best mechanism of `offered` that `preferences` accept: highest q first (absent q
    counts as 1, as in HTTP), then the order of `preferences`, then the offer's order.
    Used by the server on Security-Client and by the client on Security-Server."""
    best: tuple[Decimal, int, int] | None = None
    chosen: SecurityMechanism | None = None
    for pos, mech in enumerate(offered):
        rank = next((i for i, s in enumerate(preferences) if s.matches(mech)), None)
        if rank is None:
            continue
        q = mech.q if mech.q is not None else Decimal(1)
        key = (-q, rank, pos)
        if best is None or key < best:
            best, chosen = key, mech
    if chosen is None:
        names = ", ".join(sorted({m.name for m in offered})) or "nothing"
        raise SecAgreeError(f"no acceptable security mechanism offered ({names})")
    return chosen


def verify_security_verify(received: Sequence[SecurityMechanism],
                           sent: Sequence[SecurityMechanism]) -> None:
    """RFC 3329 §2.3.1: Security-Verify must list exactly the Security-Server mechanisms sent,
    parameter for parameter; case, whitespace and order are not significant."""
    want = sorted(m.canonical() for m in sent)
    got = sorted(m.canonical() for m in received)
    if want == got:
        return
    missing = [str(m) for m in sent if m.canonical() not in got]
    extra = [str(m) for m in received if m.canonical() not in want]
    detail = []
    if missing:
        detail.append("missing " + ", ".join(missing))
    if extra:
        detail.append("unexpected " + ", ".join(extra))
    if not detail:
        detail.append(f"{len(received)} mechanisms where {len(sent)} were sent")
    raise SecurityVerifyMismatch("Security-Verify does not match the Security-Server sent: "
                                 + "; ".join(detail))


def verify_header_values(values: Iterable[str], sent: Sequence[SecurityMechanism]) -> None:
    """`verify_security_verify` on raw Security-Verify field values (no header → mismatch)."""
    vals = list(values)
    if not vals:
        raise SecurityVerifyMismatch("Security-Verify missing from the protected request")
    verify_security_verify(parse_mechanisms(vals, "Security-Verify"), sent)


# ---- registration keys and the four SAs (DESIGN §2, Fig 1) -----------------------------

REG_INFO = b"ipsec-m2ms"
REG_OKM_LENGTH = 48
MIN_NONCE_BYTES = 16


@dataclass(frozen=True)
class Endpoint:
    """One side's sec-agree parameters: address, the SPIs it receives on, its two ports."""

    ip: str
    spi_c: int
    spi_s: int
    port_c: int
    port_s: int

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.ip)
        except ValueError:
            raise ValueError(f"sec-agree endpoint address {self.ip!r} is not IPv4") from None
        for name in ("spi_c", "spi_s", "port_c", "port_s"):
            lo, hi = _NUMERIC[name.replace("_", "-")]
            v = getattr(self, name)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"sec-agree {name.replace('_', '-')} {v!r} out of range "
                                 f"({lo}..{hi})")
        if self.spi_c == self.spi_s:
            raise ValueError(f"spi-c and spi-s must differ (both {self.spi_c})")
        if self.port_c == self.port_s:
            raise ValueError(f"port-c and port-s must differ (both {self.port_c})")

    @classmethod
    def of(cls, ip: str, mech: SecurityMechanism) -> Endpoint:
        return cls(ip, mech.spi_c, mech.spi_s, mech.port_c, mech.port_s)


@dataclass(frozen=True)
class Agreement:
    """The agreed algorithms and both sides' parameters."""

    alg: str
    ealg: str
    client: Endpoint
    server: Endpoint

    def __post_init__(self) -> None:
        KeyPair.cut(b"", b"", self.ealg, self.alg)  # validates the names


def agreement(client_offer: Sequence[SecurityMechanism], server_mech: SecurityMechanism,
              client_ip: str, server_ip: str) -> Agreement:
    """The agreement for the Security-Server mechanism chosen (`server_mech`) and the client's
    Security-Client entry with the same algorithms."""
    reason = server_mech.unsupported_reason()
    if reason is not None:
        raise SecAgreeError(f"Security-Server mechanism unusable: {reason}")
    for mech in client_offer:
        if (mech.unsupported_reason() is None and mech.alg == server_mech.alg
                and mech.ealg == server_mech.ealg):
            assert server_mech.alg is not None and server_mech.ealg is not None
            return Agreement(server_mech.alg, server_mech.ealg, Endpoint.of(client_ip, mech),
                             Endpoint.of(server_ip, server_mech))
    raise SecAgreeError(f"the client offered no {server_mech.alg}/{server_mech.ealg} "
                        f"{IPSEC_M2MS} mechanism")


def derive_registration_keys(psk: bytes, nonce: bytes, agreed: Agreement) -> KeyPair:
    """okm = HKDF-SHA-256(ikm=PSK, salt=nonce, info=b"ipsec-m2ms" + client spi-c + client
    spi-s + server spi-c + server spi-s (4 bytes big-endian each), 48); enc okm[0:16],
    integrity okm[16:48]; the same keys for all four SAs."""
    if not psk:
        raise ValueError("empty PSK")
    if len(nonce) < MIN_NONCE_BYTES:
        raise ValueError(f"nonce of {len(nonce)} bytes, need at least {MIN_NONCE_BYTES}")
    c, s = agreed.client, agreed.server
    info = REG_INFO + struct.pack(">IIII", c.spi_c, c.spi_s, s.spi_c, s.spi_s)
    okm = hkdf_sha256(psk, nonce, info, REG_OKM_LENGTH)
    return KeyPair.cut(okm[0:16], okm[16:48], agreed.ealg, agreed.alg)


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class SaSet:
    """What one side installs: SAs it sends with, SAs it receives with, and its policies."""

    outbound: tuple[SecurityAssociation, ...]
    inbound: tuple[SecurityAssociation, ...]
    policies: tuple[Policy, ...]

    @property
    def sas(self) -> tuple[SecurityAssociation, ...]:
        return self.inbound + self.outbound


def _sa(src: str, sport: int, dst: str, dport: int, spi: int, agreed: Agreement,
        keys: KeyPair) -> SecurityAssociation:
    sel = Selector(src, dst, IPPROTO_UDP, sport, dport)
    return SecurityAssociation(src, dst, spi, agreed.ealg, keys.enc_key, agreed.alg,
                               keys.auth_key, selector=sel)


def four_sas(agreed: Agreement, keys: KeyPair) -> list[SecurityAssociation]:
    """The four SAs in DESIGN §2 order; each SA's SPI is the one its receiver chose:
    client port-c → server port-s (server spi-s), server port-s → client port-c (client
    spi-c), server port-c → client port-s (client spi-s), client port-s → server port-c
    (server spi-c)."""
    c, s = agreed.client, agreed.server
    return [
        _sa(c.ip, c.port_c, s.ip, s.port_s, s.spi_s, agreed, keys),
        _sa(s.ip, s.port_s, c.ip, c.port_c, c.spi_c, agreed, keys),
        _sa(s.ip, s.port_c, c.ip, c.port_s, c.spi_s, agreed, keys),
        _sa(c.ip, c.port_s, s.ip, s.port_c, s.spi_c, agreed, keys),
    ]


def _policy(sa: SecurityAssociation, direction: Direction) -> Policy:
    assert sa.selector is not None
    return Policy(sa.selector, direction, sa.src, sa.dst, spi=sa.spi)


def registration_sas(agreed: Agreement, keys: KeyPair, side: Side) -> SaSet:
    """The four SAs and four policies as `side` installs them (client sends on SAs 0 and 3,
    the server on 1 and 2); both sides' sets describe the same four SAs."""
    sas = four_sas(agreed, keys)
    mine = (0, 3) if side is Side.CLIENT else (1, 2)
    out = tuple(sas[i] for i in mine)
    inb = tuple(sas[i] for i in range(4) if i not in mine)
    policies = tuple([_policy(sa, Direction.OUT) for sa in out]
                     + [_policy(sa, Direction.IN) for sa in inb])
    return SaSet(out, inb, policies)


__all__ = [
    "ANNEX_H_MECHANISMS", "DEFAULT_SUITES", "IPSEC_M2MS", "Agreement", "Endpoint", "KeyPair",
    "SaSet", "SecAgreeError", "SecurityMechanism", "SecurityVerifyMismatch", "Side", "Suite",
    "agreement", "choose_mechanism", "derive_registration_keys", "four_sas", "hkdf_sha256",
    "new_spi", "offer", "parse_mechanisms", "registration_sas", "serialize_mechanisms",
    "verify_header_values", "verify_security_verify",
]
