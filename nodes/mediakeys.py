"""Media keying of the secure data channel (DESIGN §2 "Media keys", Fig 2; rekey, Fig 3 step 9).

Offer and answer each carry, per media section, a media-level SDP attribute

    a=m2m-key:<nonce: base64 of 16 bytes>;spi=<decimal u32>;ealg=aes-cbc;alg=hmac-sha-256-128

where `spi` is the SPI its sender *receives* on. Both sides derive

    okm = HKDF-SHA-256(ikm=nonce_offer + nonce_answer, salt=Call-ID (UTF-8),
                       info=b"m2m-media" + m-line index (1 byte), length=96)

offerer→answerer: enc okm[0:16], auth okm[16:48]; answerer→offerer: enc okm[48:64],
auth okm[64:96]. One SA per direction covers the RTP and the RTCP (RTP+1) port: a policy for
each port, both on the same SA. The nonces are key material: `M2mKey` and `KeyPair` hide them
and the keys in their reprs. The rekey reuses all this with fresh nonces and SPIs.

Also the generic keying helpers the sec-agree module shares: HKDF, `KeyPair`, `new_spi`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import random
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nodes.ipsec.api import ANY, IPPROTO_UDP, Direction, Policy, SecurityAssociation, Selector
from nodes.sip.sdp import Media

ATTRIBUTE = "m2m-key"
NONCE_BYTES = 16
MEDIA_INFO = b"m2m-media"
MEDIA_OKM_LENGTH = 96
SPI_MIN = 256  # RFC 4303: 1-255 reserved by IANA, 0 for local use
SPI_MAX = 2**32 - 1
ENC_KEY_LENGTH = {"aes-cbc": 16, "null": 0}
# HMAC keys as long as the hash output (RFC 4868 §2.1.1, RFC 2404 §3): SHA-1 takes the first
# 20 bytes of its 32-byte integrity slice.
AUTH_KEY_LENGTH = {"hmac-sha-256-128": 32, "hmac-sha-1-96": 20}
_DIGITS_RE = re.compile(r"[0-9]+\Z")


# ---- generic keying helpers ------------------------------------------------------------------

def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256 (extract with `salt`, expand with `info`)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True, repr=False)
class KeyPair:
    """An encryption and an integrity key (for one SA or several). Never shown in reprs."""

    enc_key: bytes
    auth_key: bytes

    @classmethod
    def cut(cls, enc: bytes, auth: bytes, ealg: str, alg: str) -> KeyPair:
        """Keys of the lengths `ealg`/`alg` use, from a 16-byte and a 32-byte slice."""
        if ealg not in ENC_KEY_LENGTH:
            raise ValueError(f"unknown encryption algorithm {ealg!r}")
        if alg not in AUTH_KEY_LENGTH:
            raise ValueError(f"unknown integrity algorithm {alg!r}")
        return cls(enc[:ENC_KEY_LENGTH[ealg]], auth[:AUTH_KEY_LENGTH[alg]])

    def __repr__(self) -> str:
        return f"KeyPair(enc={len(self.enc_key)}B, auth={len(self.auth_key)}B, keys=<hidden>)"

    __str__ = __repr__


def new_spi(in_use: Collection[int] = (), rng: random.Random | None = None) -> int:
    """A random SPI in 256..2^32-1 that is not in `in_use`."""
    for _ in range(1000):
        spi = rng.randint(SPI_MIN, SPI_MAX) if rng else SPI_MIN + secrets.randbelow(
            SPI_MAX - SPI_MIN + 1)
        if spi not in in_use:
            return spi
    raise RuntimeError("no free SPI found")  # only with an absurd `in_use`


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


# ---- the a=m2m-key attribute ---------------------------------------------------------------

@dataclass(frozen=True)
class M2mKey:
    """One a=m2m-key value. Parsed values serialise to their original text."""

    nonce: bytes = field(repr=False)
    spi: int
    ealg: str = "aes-cbc"
    alg: str = "hmac-sha-256-128"
    _raw: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_BYTES:
            raise ValueError(f"m2m-key: nonce is {len(self.nonce)} bytes, must be {NONCE_BYTES}")
        if not isinstance(self.spi, int) or not SPI_MIN <= self.spi <= SPI_MAX:
            raise ValueError(f"m2m-key: spi {self.spi!r} out of range ({SPI_MIN}..{SPI_MAX})")
        if self.ealg not in ENC_KEY_LENGTH:
            raise ValueError(f"m2m-key: unknown ealg {self.ealg!r}")
        if self.alg not in AUTH_KEY_LENGTH:
            raise ValueError(f"m2m-key: unknown alg {self.alg!r}")

    @classmethod
    def fresh(cls, spis_in_use: Collection[int] = (), ealg: str = "aes-cbc",
              alg: str = "hmac-sha-256-128") -> M2mKey:
        """A new random nonce and a free SPI (call start and rekey)."""
        return cls(new_nonce(), new_spi(spis_in_use), ealg, alg)

    @classmethod
    def parse(cls, value: str) -> M2mKey:
        """The attribute value (the text after "a=m2m-key:")."""
        if not value:
            raise ValueError("m2m-key: empty value")
        nonce_text, *params = value.split(";")
        # The nonce text is key material: errors describe it without echoing it.
        try:
            nonce = base64.b64decode(nonce_text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("m2m-key: nonce is not valid base64") from None
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"m2m-key: nonce is {len(nonce)} bytes, must be {NONCE_BYTES}")
        if base64.b64encode(nonce).decode() != nonce_text:
            raise ValueError("m2m-key: nonce is not canonical base64")
        seen: dict[str, str] = {}
        for p in params:
            name, eq, v = p.partition("=")
            if not eq or not name or not v:
                raise ValueError(f"m2m-key: malformed parameter {p!r}")
            if name not in ("spi", "ealg", "alg"):
                raise ValueError(f"m2m-key: unknown parameter {name!r}")
            if name in seen:
                raise ValueError(f"m2m-key: duplicate parameter {name!r}")
            seen[name] = v
        for name in ("spi", "ealg", "alg"):
            if name not in seen:
                raise ValueError(f"m2m-key: missing parameter {name!r}")
        spi = seen["spi"]
        if not _DIGITS_RE.match(spi):
            raise ValueError(f"m2m-key: spi {spi!r} is not a decimal number")
        if len(spi) > 10:  # keeps int() away from huge digit strings
            raise ValueError(f"m2m-key: spi {spi[:12]}... out of range ({SPI_MIN}..{SPI_MAX})")
        key = cls(nonce, int(spi), seen["ealg"], seen["alg"])
        object.__setattr__(key, "_raw", value)
        return key

    def serialize(self) -> str:
        if self._raw is not None:
            return self._raw
        nonce = base64.b64encode(self.nonce).decode()
        return f"{nonce};spi={self.spi};ealg={self.ealg};alg={self.alg}"

    __str__ = serialize

    def __repr__(self) -> str:
        return f"M2mKey(spi={self.spi}, {self.ealg}/{self.alg}, nonce=<hidden>)"


def media_key(media: Media) -> M2mKey | None:
    """The m2m-key of one SDP media section (None if it has none)."""
    values = media.attributes(ATTRIBUTE)
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"m2m-key: {len(values)} attributes in one media section")
    if values[0] is None:
        raise ValueError("m2m-key: attribute without a value")
    return M2mKey.parse(values[0])


def set_media_key(media: Media, key: M2mKey) -> None:
    """Puts `key` into a media section, replacing any m2m-key it had."""
    media.remove_attributes(ATTRIBUTE)
    media.add_attribute(ATTRIBUTE, key.serialize())


# ---- derivation and SAs ---------------------------------------------------------------------

class Role(enum.Enum):
    OFFERER = "offerer"
    ANSWERER = "answerer"


@dataclass(frozen=True)
class MediaKeys:
    offer_to_answer: KeyPair
    answer_to_offer: KeyPair


def derive_media_keys(offer: M2mKey, answer: M2mKey, call_id: str,
                      mline_index: int) -> MediaKeys:
    if (offer.ealg, offer.alg) != (answer.ealg, answer.alg):
        raise ValueError(f"m2m-key: answer uses {answer.ealg}/{answer.alg}, "
                         f"offer {offer.ealg}/{offer.alg}")
    if not call_id:
        raise ValueError("m2m-key: empty Call-ID")
    if not 0 <= mline_index <= 255:
        raise ValueError(f"m2m-key: m-line index {mline_index} out of range (0..255)")
    info = MEDIA_INFO + bytes([mline_index])
    okm = hkdf_sha256(offer.nonce + answer.nonce, call_id.encode("utf-8"), info,
                      MEDIA_OKM_LENGTH)
    return MediaKeys(KeyPair.cut(okm[0:16], okm[16:48], offer.ealg, offer.alg),
                     KeyPair.cut(okm[48:64], okm[64:96], offer.ealg, offer.alg))


@dataclass(frozen=True)
class MediaSaSet:
    """One side's SAs for one media section and its four policies (OUT RTP, OUT RTCP,
    IN RTP, IN RTCP)."""

    outbound: SecurityAssociation
    inbound: SecurityAssociation
    policies: tuple[Policy, ...]

    @property
    def sas(self) -> tuple[SecurityAssociation, SecurityAssociation]:
        return self.inbound, self.outbound


def _check_endpoint(ip: str, port: int, what: str) -> None:
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        raise ValueError(f"{what} address {ip!r} is not IPv4") from None
    if not isinstance(port, int) or not 1 <= port <= 65534:
        raise ValueError(f"{what} RTP port {port!r} out of range (1..65534; RTCP is RTP+1)")


def media_sas(role: Role, offer: M2mKey, answer: M2mKey, call_id: str, mline_index: int,
              local_ip: str, local_rtp_port: int, remote_ip: str,
              remote_rtp_port: int, keys: MediaKeys | None = None) -> MediaSaSet:
    """The SAs and policies `role` installs for media section `mline_index`.

    The outbound SA uses the SPI the peer receives on (its m2m-key's spi). Outbound policies
    are pinned to that SPI; inbound ones are not, so that during a rekey the old and the new
    inbound SA are both accepted until the old one is deleted (make before break)."""
    _check_endpoint(local_ip, local_rtp_port, "local")
    _check_endpoint(remote_ip, remote_rtp_port, "remote")
    if keys is None:  # given keys: Fig 3 reuses the ones that crossed the network
        keys = derive_media_keys(offer, answer, call_id, mline_index)
    if role is Role.OFFERER:
        send, recv, out_spi, in_spi = keys.offer_to_answer, keys.answer_to_offer, answer.spi, \
            offer.spi
    else:
        send, recv, out_spi, in_spi = keys.answer_to_offer, keys.offer_to_answer, offer.spi, \
            answer.spi
    out_sa = SecurityAssociation(local_ip, remote_ip, out_spi, offer.ealg, send.enc_key,
                                 offer.alg, send.auth_key,
                                 selector=Selector(local_ip, remote_ip, IPPROTO_UDP))
    # The inbound SA takes the peer from any address: when the peer moves to another
    # interface (Fig 4), its packets keep matching while our policies follow it.
    in_sa = SecurityAssociation(remote_ip, local_ip, in_spi, offer.ealg, recv.enc_key,
                                offer.alg, recv.auth_key,
                                selector=Selector(ANY, local_ip, IPPROTO_UDP))
    ports = ((local_rtp_port, remote_rtp_port), (local_rtp_port + 1, remote_rtp_port + 1))
    policies = [Policy(Selector(local_ip, remote_ip, IPPROTO_UDP, lp, rp), Direction.OUT,
                       local_ip, remote_ip, spi=out_spi) for lp, rp in ports]
    policies += [Policy(Selector(remote_ip, local_ip, IPPROTO_UDP, rp, lp), Direction.IN,
                        remote_ip, local_ip) for lp, rp in ports]
    return MediaSaSet(out_sa, in_sa, tuple(policies))
