"""SIP Digest authentication as RFC 7616 with algorithm=SHA-256 and qop=auth (DESIGN §2, Fig 1).

The registrar's 401 carries `WWW-Authenticate: Digest realm=..., nonce=..., algorithm=SHA-256,
qop="auth"` whose nonce is base64 of 16+ random bytes (its decoded bytes also salt the
sec-agree key derivation); the protected REGISTER answers with `Authorization: Digest ...`.

The password is the terminal's PSK written as lowercase hex (`password_from_psk`): PSKs are
binary (config/credentials.json holds them as hex), Digest needs text, and hex is the one
spelling both sides already share.

    response = H(H(user:realm:password) : nonce : nc : cnonce : qop : H(method:uri))

Parsed values keep their text and serialise to it unchanged. Malformed values raise
ValueError with a precise message (answer 400); `check()` says why a response is refused
(answer 403) and compares digests in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from nodes.sip.grammar import QUOTED, TOKEN, quote, unquote

ALGORITHM = "SHA-256"
QOP_AUTH = "auth"
MIN_NONCE_BYTES = 16
_SCHEME_RE = re.compile(f"[ \t]*({TOKEN})(?:[ \t]+|\\Z)")
_PARAM_RE = re.compile(f"[ \t]*({TOKEN})[ \t]*=[ \t]*({QUOTED}|{TOKEN})[ \t]*(,|\\Z)")
_NC_RE = re.compile(r"[0-9a-fA-F]{8}\Z")
_HEX_RE = re.compile(r"[0-9a-fA-F]+\Z")


def password_from_psk(psk: bytes) -> str:
    """The Digest password of a terminal: its PSK as lowercase hex."""
    if not psk:
        raise ValueError("empty PSK")
    return psk.hex()


def new_nonce(nbytes: int = MIN_NONCE_BYTES) -> str:
    """A fresh challenge nonce: base64 of `nbytes` (16+) random bytes."""
    if nbytes < MIN_NONCE_BYTES:
        raise ValueError(f"nonce of {nbytes} bytes, need at least {MIN_NONCE_BYTES}")
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def nonce_bytes(nonce: str) -> bytes:
    """The random bytes behind a nonce (strict base64, at least 16 bytes)."""
    try:
        raw = base64.b64decode(nonce.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"Digest nonce {nonce[:40]!r} is not base64") from None
    if len(raw) < MIN_NONCE_BYTES:
        raise ValueError(f"Digest nonce has {len(raw)} bytes, need at least {MIN_NONCE_BYTES}")
    return raw


def _parse(text: str, what: str) -> dict[str, str]:
    """'Digest a=b, c="d"' -> {name (lowercase): raw value}; rejects other schemes,
    duplicates and anything that is not a list of auth-params."""
    m = _SCHEME_RE.match(text)
    if m is None or m.group(1).lower() != "digest":
        got = m.group(1) if m else text.strip()[:20]
        raise ValueError(f"{what}: scheme {got!r} is not Digest")
    params: dict[str, str] = {}
    pos, end = m.end(), len(text)
    while pos < end:
        p = _PARAM_RE.match(text, pos)
        if p is None:
            raise ValueError(f"{what}: malformed parameter at {text[pos:].lstrip()[:20]!r}")
        name = p.group(1).lower()
        if name in params:
            raise ValueError(f"{what}: duplicate parameter {name!r}")
        params[name] = p.group(2)
        pos = p.end()
        if p.group(3) == "," and pos >= end:
            raise ValueError(f"{what}: trailing comma")
    if not params:
        raise ValueError(f"{what}: no parameters")
    return params


def _quoted(params: dict[str, str], name: str, what: str, required: bool = True) -> str | None:
    v = params.pop(name, None)
    if v is None:
        if required:
            raise ValueError(f"{what}: missing parameter {name!r}")
        return None
    if not v.startswith('"'):
        raise ValueError(f"{what}: {name} must be a quoted string")
    return unquote(v)


def _token(params: dict[str, str], name: str, what: str, quoted_ok: bool) -> str | None:
    v = params.pop(name, None)
    if v is None or not v.startswith('"'):
        return v
    if not quoted_ok:
        raise ValueError(f"{what}: {name} must not be quoted")
    return unquote(v)


def _extras(extra: tuple[tuple[str, str], ...]) -> str:
    return "".join(f", {n}={v}" for n, v in extra)


@dataclass(frozen=True)
class DigestChallenge:
    """A WWW-Authenticate (or Proxy-Authenticate) Digest challenge."""

    realm: str
    nonce: str
    algorithm: str = ALGORITHM
    qop: tuple[str, ...] = (QOP_AUTH,)
    opaque: str | None = None
    stale: bool = False
    extra: tuple[tuple[str, str], ...] = ()  # other auth-params, raw
    _raw: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def new(cls, realm: str, opaque: str | None = None,
            nbytes: int = MIN_NONCE_BYTES) -> DigestChallenge:
        return cls(realm, new_nonce(nbytes), opaque=opaque)

    @property
    def nonce_bytes(self) -> bytes:
        return nonce_bytes(self.nonce)

    @classmethod
    def parse(cls, text: str, what: str = "WWW-Authenticate") -> DigestChallenge:
        params = _parse(text, what)
        realm = _quoted(params, "realm", what) or ""  # required: never None here
        nonce = _quoted(params, "nonce", what) or ""
        opaque = _quoted(params, "opaque", what, required=False)
        qop_text = _quoted(params, "qop", what, required=False)
        qop: tuple[str, ...] = ()
        if qop_text is not None:
            qop = tuple(q.strip(" \t") for q in qop_text.split(","))
            if not all(re.match(f"{TOKEN}\\Z", q) for q in qop):
                raise ValueError(f"{what}: malformed qop list {qop_text!r}")
        algorithm = _token(params, "algorithm", what, quoted_ok=True) or "MD5"  # RFC default
        stale = _token(params, "stale", what, quoted_ok=False)
        if stale is not None and stale.lower() not in ("true", "false"):
            raise ValueError(f"{what}: stale must be true or false, not {stale!r}")
        return cls(realm, nonce, algorithm, qop, opaque, (stale or "").lower() == "true",
                   tuple(params.items()), text.strip(" \t"))

    def serialize(self) -> str:
        if self._raw is not None:
            return self._raw
        out = f"Digest realm={quote(self.realm)}, nonce={quote(self.nonce)}, " \
              f"algorithm={self.algorithm}"
        if self.qop:
            out += f", qop={quote(', '.join(self.qop))}"
        if self.opaque is not None:
            out += f", opaque={quote(self.opaque)}"
        if self.stale:
            out += ", stale=true"
        return out + _extras(self.extra)

    __str__ = serialize


@dataclass(frozen=True)
class DigestCredentials:
    """An Authorization (or Proxy-Authorization) Digest response."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = ALGORITHM
    qop: str | None = QOP_AUTH
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    _raw: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        what = "Authorization"
        if not _HEX_RE.match(self.response):
            raise ValueError(f"{what}: response is not hexadecimal")
        if self.algorithm.upper() == ALGORITHM and len(self.response) != 64:
            raise ValueError(f"{what}: SHA-256 response has {len(self.response)} hex digits, "
                             "not 64")
        if self.qop is not None:
            if self.nc is None or self.cnonce is None:
                raise ValueError(f"{what}: qop={self.qop} needs nc and cnonce")
            if not _NC_RE.match(self.nc):
                raise ValueError(f"{what}: nc {self.nc!r} is not 8 hex digits")
            if not self.cnonce:
                raise ValueError(f"{what}: empty cnonce")

    @classmethod
    def parse(cls, text: str, what: str = "Authorization") -> DigestCredentials:
        params = _parse(text, what)
        vals = {n: _quoted(params, n, what) or ""  # required: never None here
                for n in ("username", "realm", "nonce", "uri", "response")}
        cnonce = _quoted(params, "cnonce", what, required=False)
        opaque = _quoted(params, "opaque", what, required=False)
        algorithm = _token(params, "algorithm", what, quoted_ok=True) or "MD5"
        qop = _token(params, "qop", what, quoted_ok=True)
        nc = _token(params, "nc", what, quoted_ok=False)
        return cls(vals["username"], vals["realm"], vals["nonce"], vals["uri"],
                   vals["response"], algorithm, qop, nc, cnonce, opaque,
                   tuple(params.items()), text.strip(" \t"))

    def serialize(self) -> str:
        if self._raw is not None:
            return self._raw
        out = (f"Digest username={quote(self.username)}, realm={quote(self.realm)}, "
               f"uri={quote(self.uri)}, algorithm={self.algorithm}, nonce={quote(self.nonce)}")
        if self.qop is not None:
            out += f", nc={self.nc}, cnonce={quote(self.cnonce or '')}, qop={self.qop}"
        out += f", response={quote(self.response)}"
        if self.opaque is not None:
            out += f", opaque={quote(self.opaque)}"
        return out + _extras(self.extra)

    __str__ = serialize


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def compute_response(*, username: str, password: str, realm: str, method: str, uri: str,
                     nonce: str, nc: str, cnonce: str, qop: str = QOP_AUTH,
                     algorithm: str = ALGORITHM) -> str:
    """RFC 7616 §3.4.1 request-digest (SHA-256, qop=auth), lowercase hex."""
    if algorithm.upper() != ALGORITHM:
        raise ValueError(f"Digest algorithm {algorithm!r} not supported ({ALGORITHM} only)")
    if qop != QOP_AUTH:
        raise ValueError(f"Digest qop {qop!r} not supported ({QOP_AUTH} only)")
    ha1 = _h(f"{username}:{realm}:{password}")
    ha2 = _h(f"{method}:{uri}")
    return _h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def authorize(challenge: DigestChallenge, *, username: str, password: str, method: str,
              uri: str, cnonce: str | None = None, nc: int = 1) -> DigestCredentials:
    """The Authorization a UA sends in answer to `challenge` (ValueError if it cannot)."""
    if challenge.algorithm.upper() != ALGORITHM:
        raise ValueError(f"challenge algorithm {challenge.algorithm!r} not supported")
    if QOP_AUTH not in challenge.qop:
        raise ValueError(f"challenge qop {challenge.qop!r} does not offer {QOP_AUTH!r}")
    if not 1 <= nc <= 0xFFFFFFFF:
        raise ValueError(f"nonce count {nc} out of range")
    cnonce = cnonce if cnonce is not None else secrets.token_hex(16)
    nc_text = f"{nc:08x}"
    response = compute_response(username=username, password=password, realm=challenge.realm,
                                method=method, uri=uri, nonce=challenge.nonce, nc=nc_text,
                                cnonce=cnonce, algorithm=challenge.algorithm)
    return DigestCredentials(username, challenge.realm, challenge.nonce, uri, response,
                             challenge.algorithm, QOP_AUTH, nc_text, cnonce, challenge.opaque)


def check(creds: DigestCredentials, challenge: DigestChallenge, *, password: str,
          method: str, request_uri: str | None = None) -> str | None:
    """None if `creds` answer `challenge` correctly, else why not (for the log; answer 403).
    The username is the caller's to check against the registering AOR."""
    if creds.algorithm.upper() != ALGORITHM:
        return f"algorithm {creds.algorithm!r} is not {ALGORITHM}"
    if creds.qop != QOP_AUTH:
        return f"qop {creds.qop!r} is not {QOP_AUTH}"
    if creds.realm != challenge.realm:
        return f"realm {creds.realm!r} is not {challenge.realm!r}"
    if not hmac.compare_digest(creds.nonce.encode(), challenge.nonce.encode()):
        return "nonce does not match the challenge"
    if challenge.opaque is not None and creds.opaque != challenge.opaque:
        return "opaque does not match the challenge"
    if request_uri is not None and creds.uri != request_uri:
        return f"digest uri {creds.uri!r} is not the Request-URI {request_uri!r}"
    assert creds.nc is not None and creds.cnonce is not None  # qop=auth guarantees them
    expected = compute_response(username=creds.username, password=password,
                                realm=creds.realm, method=method, uri=creds.uri,
                                nonce=creds.nonce, nc=creds.nc, cnonce=creds.cnonce)
    if not hmac.compare_digest(expected.encode(), creds.response.lower().encode()):
        return "wrong response (password mismatch)"
    return None


def verify(creds: DigestCredentials, challenge: DigestChallenge, *, password: str,
           method: str, request_uri: str | None = None) -> bool:
    return check(creds, challenge, password=password, method=method,
                 request_uri=request_uri) is None
