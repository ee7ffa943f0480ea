"""The servers' trust domain (DESIGN §2, "Routes and trust"): proxy↔SMS and proxy↔presence
talk over manually keyed ESP SAs (like RFC 3329's `ipsec-man`), set up when the lab starts.

Both ends derive the same pair of SAs from one domain key (`config/trust.json`, hex):
okm = HKDF-SHA-256(ikm=key, salt=b"smig-trust", info=b"ipsec-man" + lower IP + higher IP,
length=104); per direction (lower→higher first) a 4-byte SPI, a 16-byte AES key and a 32-byte
HMAC-SHA-256 key. The policies cover all UDP between the two hosts.
"""

from __future__ import annotations

import socket
from pathlib import Path

from nodes.ipsec.api import IPPROTO_UDP, Direction, Policy, SecurityAssociation, Selector
from nodes.jsonin import loads
from nodes.labconfig import ConfigError
from nodes.mediakeys import hkdf_sha256

SALT = b"smig-trust"
INFO = b"ipsec-man"


def load_key(path: Path | str) -> bytes:
    try:
        text = loads(Path(path).read_bytes(), str(path)).get("key", "")
        key = bytes.fromhex(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, AttributeError, TypeError):
        raise ConfigError(f"{path}: expected {{\"key\": \"<hex>\"}}") from None
    if len(key) < 16:
        raise ConfigError(f"{path}: the trust key must be at least 16 bytes")
    return key


def static_sas(key: bytes, me: str, peer: str) -> tuple[list[SecurityAssociation],
                                                        list[Policy]]:
    """The SA pair and the two policies `me` installs for talking to `peer`."""
    lo, hi = sorted((me, peer), key=lambda ip: socket.inet_aton(ip))
    okm = hkdf_sha256(key, SALT, INFO + socket.inet_aton(lo) + socket.inet_aton(hi), 104)

    def sa(src: str, dst: str, chunk: bytes) -> SecurityAssociation:
        spi = int.from_bytes(chunk[0:4], "big") | 0x100  # never in the reserved 1..255
        return SecurityAssociation(src, dst, spi, "aes-cbc", chunk[4:20], "hmac-sha-256-128",
                                   chunk[20:52], selector=Selector(src, dst, IPPROTO_UDP))

    up, down = sa(lo, hi, okm[0:52]), sa(hi, lo, okm[52:104])
    out_sa, in_sa = (up, down) if me == lo else (down, up)
    policies = [Policy(Selector(me, peer, IPPROTO_UDP), Direction.OUT, me, peer, out_sa.spi),
                Policy(Selector(peer, me, IPPROTO_UDP), Direction.IN, peer, me)]
    return [out_sa, in_sa], policies
