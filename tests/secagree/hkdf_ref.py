"""An independent RFC 5869 HKDF-SHA-256 (hmac module only) to check the modules against."""

from __future__ import annotations

import hashlib
import hmac


def hkdf_by_hand(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]
