"""RFC 4303 ESP, transport mode, byte-compatible with Linux XFRM (esp4 + authenc).

Layout on the wire (after the IPv4 header, protocol 50):

    SPI (4) | Sequence Number (4) | IV (16 for AES-CBC, none for NULL) |
    E( payload | padding 1,2,3,... | pad length (1) | next header (1) ) | ICV

The payload + trailer is padded to the cipher block size rounded up to 4 (Linux
`ALIGN(crypto_aead_blocksize, 4)`: 16 for cbc(aes), 4 for ecb(cipher_null)); the ICV is
HMAC over SPI | seq | IV | ciphertext, truncated (RFC 4868 / RFC 2404). No ESN.

`EspPacket` is the wire format (parse/serialize), `EspTrailer` the decrypted payload +
trailer; `encrypt`/`decrypt` are pure functions of an SA; `ReplayWindow` is the RFC 4303
§3.4.3 sliding window; `SaState` bundles an SA with its sequence counter and window.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nodes.ipsec.api import AUTH_ALGS, SecurityAssociation

ESP_HEADER = struct.Struct("!II")
SEQ_MAX = 2**32 - 1
_HASHES = {"hmac-sha-256-128": hashes.SHA256, "hmac-sha-1-96": hashes.SHA1}


class IntegrityError(ValueError):
    """The ICV does not verify (wrong key or tampered packet)."""


class ReplayError(ValueError):
    """The sequence number was already seen or is left of the window."""


def iv_len(enc_alg: str) -> int:
    return 16 if enc_alg == "aes-cbc" else 0


def block_align(enc_alg: str) -> int:
    """Linux esp4: ALIGN(cipher block size, 4)."""
    return 16 if enc_alg == "aes-cbc" else 4


def icv_len(auth_alg: str) -> int:
    if auth_alg not in AUTH_ALGS:
        raise ValueError(f"unknown integrity algorithm {auth_alg!r}")
    return AUTH_ALGS[auth_alg][1]


@dataclass(frozen=True)
class EspPacket:
    """An ESP packet as on the wire (the IP payload when the IP protocol is 50)."""

    spi: int
    seq: int
    iv: bytes
    ciphertext: bytes
    icv: bytes

    @classmethod
    def parse(cls, data: bytes, iv_length: int, icv_length: int) -> EspPacket:
        """IV and ICV lengths come from the SA (the SPI picks it), not from the packet."""
        minimum = ESP_HEADER.size + iv_length + icv_length
        if len(data) < minimum:
            raise ValueError(f"ESP packet too short: {len(data)} bytes, need at least {minimum}")
        spi, seq = ESP_HEADER.unpack_from(data)
        body = data[ESP_HEADER.size :]
        ct_end = len(body) - icv_length
        return cls(spi, seq, body[:iv_length], body[iv_length:ct_end], body[ct_end:])

    @staticmethod
    def peek_spi(data: bytes) -> int:
        if len(data) < ESP_HEADER.size:
            raise ValueError(f"ESP packet too short for its header: {len(data)} bytes")
        return int(ESP_HEADER.unpack_from(data)[0])

    def serialize(self) -> bytes:
        return ESP_HEADER.pack(self.spi, self.seq) + self.iv + self.ciphertext + self.icv

    def authenticated_part(self) -> bytes:
        return ESP_HEADER.pack(self.spi, self.seq) + self.iv + self.ciphertext


@dataclass(frozen=True)
class EspTrailer:
    """The plaintext inside ESP: payload, monotonic padding, pad length, next header."""

    payload: bytes
    next_header: int
    padding: bytes = b""

    @classmethod
    def build(cls, payload: bytes, next_header: int, align: int) -> EspTrailer:
        pad_len = (-(len(payload) + 2)) % align
        return cls(payload, next_header, bytes(range(1, pad_len + 1)))

    @classmethod
    def parse(cls, plaintext: bytes) -> EspTrailer:
        if len(plaintext) < 2:
            raise ValueError(f"ESP plaintext too short for its trailer: {len(plaintext)} bytes")
        pad_len, next_header = plaintext[-2], plaintext[-1]
        if pad_len + 2 > len(plaintext):
            raise ValueError(
                f"ESP pad length {pad_len} exceeds the {len(plaintext) - 2}-byte plaintext"
            )
        end = len(plaintext) - 2 - pad_len
        return cls(plaintext[:end], next_header, plaintext[end:-2])

    def serialize(self) -> bytes:
        if not 0 <= self.next_header <= 255 or len(self.padding) > 255:
            raise ValueError("next header or padding out of range")
        return self.payload + self.padding + bytes([len(self.padding), self.next_header])


def _icv(sa: SecurityAssociation, data: bytes) -> bytes:
    mac = crypto_hmac.HMAC(sa.auth_key, _HASHES[sa.auth_alg]())
    mac.update(data)
    return mac.finalize()[: icv_len(sa.auth_alg)]


def encrypt(
    sa: SecurityAssociation, seq: int, payload: bytes, next_header: int, iv: bytes | None = None
) -> EspPacket:
    """ESP-protect `payload` (the transport header + data) with sequence number `seq`.
    `iv` is random unless given (known-answer tests)."""
    if not 1 <= seq <= SEQ_MAX:
        raise ValueError(f"sequence number {seq} out of range 1..2^32-1")
    trailer = EspTrailer.build(payload, next_header, block_align(sa.enc_alg)).serialize()
    if sa.enc_alg == "aes-cbc":
        iv = os.urandom(16) if iv is None else iv
        if len(iv) != 16:
            raise ValueError(f"AES-CBC IV must be 16 bytes, got {len(iv)}")
        enc = Cipher(algorithms.AES(sa.enc_key), modes.CBC(iv)).encryptor()
        ciphertext = enc.update(trailer) + enc.finalize()
    else:
        if iv:
            raise ValueError("NULL encryption takes no IV")
        iv, ciphertext = b"", trailer
    unsigned = EspPacket(sa.spi, seq, iv, ciphertext, b"")
    return EspPacket(sa.spi, seq, iv, ciphertext, _icv(sa, unsigned.authenticated_part()))


def verify(sa: SecurityAssociation, packet: EspPacket) -> None:
    """Raise IntegrityError unless the ICV verifies (checked before any decryption)."""
    if packet.spi != sa.spi:
        raise ValueError(f"SPI 0x{packet.spi:08x} does not belong to SA 0x{sa.spi:08x}")
    if not hmac.compare_digest(_icv(sa, packet.authenticated_part()), packet.icv):
        raise IntegrityError(f"ICV mismatch on SPI 0x{sa.spi:08x} seq {packet.seq}")


def decrypt(sa: SecurityAssociation, data: bytes) -> tuple[EspPacket, EspTrailer]:
    """Parse, verify and decrypt one ESP packet (no replay check: see SaState.receive)."""
    packet = EspPacket.parse(data, iv_len(sa.enc_alg), icv_len(sa.auth_alg))
    verify(sa, packet)
    align = block_align(sa.enc_alg)
    if not packet.ciphertext or len(packet.ciphertext) % align:
        raise ValueError(
            f"ESP ciphertext length {len(packet.ciphertext)} is not a multiple of {align}"
        )
    if sa.enc_alg == "aes-cbc":
        dec = Cipher(algorithms.AES(sa.enc_key), modes.CBC(packet.iv)).decryptor()
        plaintext = dec.update(packet.ciphertext) + dec.finalize()
    else:
        plaintext = packet.ciphertext
    return packet, EspTrailer.parse(plaintext)


@dataclass
class ReplayWindow:
    """RFC 4303 §3.4.3 anti-replay: `top` is the highest authenticated sequence number, bit i
    of `bitmap` says top - i was seen. size 0 disables the check (as XFRM replay-window 0)."""

    size: int = 32
    top: int = 0
    bitmap: int = 0

    def check(self, seq: int) -> None:
        """Raise ReplayError if `seq` must be dropped (done before and after the ICV check)."""
        if self.size == 0:
            return
        if seq == 0:
            raise ReplayError("sequence number 0 is never sent")
        if seq > self.top:
            return
        diff = self.top - seq
        if diff >= self.size:
            raise ReplayError(f"seq {seq} is left of the window (top {self.top})")
        if self.bitmap >> diff & 1:
            raise ReplayError(f"seq {seq} was already received")

    def update(self, seq: int) -> None:
        """Record an authenticated `seq` (call only after check() and the ICV passed)."""
        mask = (1 << max(self.size, 1)) - 1
        if seq > self.top:
            self.bitmap = ((self.bitmap << (seq - self.top)) | 1) & mask
            self.top = seq
        else:
            self.bitmap |= 1 << (self.top - seq)


@dataclass
class SaState:
    """An SA with its runtime state: next outbound sequence number, inbound window, stats.

    A state built from an SA that already carries `seq`/`replay_top` (an SA moved to new
    addresses) continues from there; everything at or below `replay_top` counts as seen."""

    sa: SecurityAssociation
    window: ReplayWindow = field(init=False)
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = self.sa.replay_window
        top = self.sa.replay_top
        self.window = ReplayWindow(size, top, (1 << size) - 1 if top and size else 0)
        for key in ("packets_in", "packets_out", "integrity_failed", "replay_dropped"):
            self.stats.setdefault(key, 0)

    def send(self, payload: bytes, next_header: int, iv: bytes | None = None) -> bytes:
        """Protect one outbound payload; the sequence number starts at 1 and never wraps."""
        if self.sa.seq >= SEQ_MAX:
            raise OverflowError(f"SA 0x{self.sa.spi:08x}: sequence number space exhausted")
        self.sa.seq += 1
        self.stats["packets_out"] += 1
        return encrypt(self.sa, self.sa.seq, payload, next_header, iv).serialize()

    def receive(self, data: bytes) -> EspTrailer:
        """Replay-check, verify, decrypt, then slide the window. Raises ReplayError,
        IntegrityError or ValueError; counts the first two in `stats`."""
        if len(data) < ESP_HEADER.size:
            raise ValueError(f"ESP packet too short for its header: {len(data)} bytes")
        seq = ESP_HEADER.unpack_from(data)[1]
        try:
            self.window.check(seq)
        except ReplayError:
            self.stats["replay_dropped"] += 1
            raise
        try:
            _packet, trailer = decrypt(self.sa, data)
        except IntegrityError:
            self.stats["integrity_failed"] += 1
            raise
        self.window.update(seq)
        self.sa.replay_top = self.window.top
        self.stats["packets_in"] += 1
        return trailer
