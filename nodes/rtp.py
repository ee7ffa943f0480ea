"""RTP (RFC 3550) packets, minimal RTCP, and receiver-side sequence accounting.

* `RtpPacket` — the fixed header, CSRC list, header extension and padding, with byte-exact
  parse/serialize round trips and precise `ValueError`s for malformed input.
* `seq_diff`/`seq_add`/`seq_gt`, `ts_diff` — wraparound-safe arithmetic modulo 2^16 / 2^32.
* `SequenceTracker` — per-SSRC extended sequence numbers (RFC 3550 A.1) with counts of
  lost, duplicate and reordered (late) packets and the longest run of missing numbers.
* `RtcpPacket`, `SenderReport`, `parse_rtcp` — enough RTCP to send a sender report and to
  read (or skip) any compound RTCP packet gracefully.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RTP_VERSION = 2
RTP_HEADER_LEN = 12
_FIXED = struct.Struct("!BBHII")  # V/P/X/CC, M/PT, seq, timestamp, SSRC
_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"RTP {name} {value} out of range 0..{(1 << bits) - 1}")


@dataclass(frozen=True)
class RtpExtension:
    """Header extension (RFC 3550 5.3.1): 16-bit profile id, data in 32-bit words."""

    profile: int
    data: bytes = b""

    def __post_init__(self) -> None:
        _check_range("extension profile", self.profile, 16)
        if len(self.data) % 4:
            raise ValueError(
                f"RTP extension data must be a multiple of 4 bytes, got {len(self.data)}")
        if len(self.data) // 4 >= _SEQ_MOD:
            raise ValueError(f"RTP extension data too long: {len(self.data)} bytes")


@dataclass(frozen=True)
class RtpPacket:
    """One RTP packet. `padding` is the number of padding bytes (0 = P bit clear)."""

    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension: RtpExtension | None = None
    padding: int = 0

    def __post_init__(self) -> None:
        _check_range("payload type", self.payload_type, 7)
        _check_range("sequence number", self.seq, 16)
        _check_range("timestamp", self.timestamp, 32)
        _check_range("SSRC", self.ssrc, 32)
        if len(self.csrc) > 15:
            raise ValueError(f"RTP CSRC list too long: {len(self.csrc)} > 15")
        for c in self.csrc:
            _check_range("CSRC", c, 32)
        # the last padding byte holds the count, itself included: 1..255
        _check_range("padding length", self.padding, 8)

    def serialize(self) -> bytes:
        b0 = (RTP_VERSION << 6) | (0x20 if self.padding else 0) | len(self.csrc)
        if self.extension is not None:
            b0 |= 0x10
        b1 = (0x80 if self.marker else 0) | self.payload_type
        parts = [_FIXED.pack(b0, b1, self.seq, self.timestamp, self.ssrc)]
        parts += [struct.pack("!I", c) for c in self.csrc]
        if self.extension is not None:
            ext = self.extension
            parts.append(struct.pack("!HH", ext.profile, len(ext.data) // 4) + ext.data)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes([self.padding]))
        return b"".join(parts)

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        n = len(data)
        if n < RTP_HEADER_LEN:
            raise ValueError(f"RTP packet too short: {n} bytes < {RTP_HEADER_LEN}")
        b0, b1, seq, ts, ssrc = _FIXED.unpack_from(data)
        version = b0 >> 6
        if version != RTP_VERSION:
            raise ValueError(f"RTP version {version} not supported")
        cc = b0 & 0x0F
        pos = RTP_HEADER_LEN + 4 * cc
        if n < pos:
            raise ValueError(f"RTP packet too short for {cc} CSRCs: {n} bytes < {pos}")
        csrc = struct.unpack_from(f"!{cc}I", data, RTP_HEADER_LEN)
        extension = None
        if b0 & 0x10:
            if n < pos + 4:
                raise ValueError(
                    f"RTP extension header truncated: {n} bytes < {pos + 4}")
            profile, words = struct.unpack_from("!HH", data, pos)
            end = pos + 4 + 4 * words
            if n < end:
                raise ValueError(
                    f"RTP extension of {words} words exceeds packet: {n} bytes < {end}")
            extension = RtpExtension(profile, bytes(data[pos + 4:end]))
            pos = end
        padding = 0
        if b0 & 0x20:
            if n == pos:
                raise ValueError("RTP padding bit set but no payload to hold the count")
            padding = data[-1]
            if padding == 0:
                raise ValueError("RTP padding count 0 invalid (it includes itself)")
            if padding > n - pos:
                raise ValueError(
                    f"RTP padding {padding} bytes longer than payload {n - pos} bytes")
        payload = bytes(data[pos:n - padding])
        return cls(b1 & 0x7F, seq, ts, ssrc, payload, bool(b1 & 0x80), csrc, extension,
                   padding)


# --- wraparound-safe arithmetic ---------------------------------------------------------

def seq_add(seq: int, delta: int) -> int:
    return (seq + delta) % _SEQ_MOD


def seq_diff(a: int, b: int) -> int:
    """a - b modulo 2^16 as a signed value in [-32768, 32767]."""
    return (a - b + 0x8000) % _SEQ_MOD - 0x8000


def seq_gt(a: int, b: int) -> bool:
    """True if a is after b in sequence-number order (RFC 1982 style)."""
    return seq_diff(a, b) > 0


def ts_add(ts: int, delta: int) -> int:
    return (ts + delta) % _TS_MOD


def ts_diff(a: int, b: int) -> int:
    """a - b modulo 2^32 as a signed value."""
    return (a - b + 0x8000_0000) % _TS_MOD - 0x8000_0000


# --- receiver accounting (RFC 3550 A.1, without probation) ------------------------------

MAX_DROPOUT = 3000
MAX_MISORDER = 100
_WINDOW = 1024  # recent extended numbers remembered for duplicate detection


@dataclass
class SequenceTracker:
    """Extended sequence numbers and loss accounting of one SSRC.

    Differs from RFC 3550 A.1 only in having no probation: the lab has no stray senders,
    and probation would leave the first packets of a stream uncounted. A jump larger than
    MAX_DROPOUT (or back more than MAX_MISORDER) is taken as a sender restart once two
    packets in a row confirm it, as in A.1 (both then count; a lone stray is ignored).
    """

    base_seq: int = -1  # extended number of the first packet counted
    max_ext: int = -1  # highest extended number seen
    received: int = 0  # distinct packets counted (duplicates excluded)
    duplicates: int = 0
    reordered: int = 0  # arrived after a higher number (late but not lost)
    largest_seq_gap: int = 0  # longest run of missing numbers seen at arrival time
    resyncs: int = 0
    _bad_seq: int = -1
    _window: int = 0  # bit i set = extended number max_ext - i received

    @property
    def expected(self) -> int:
        return 0 if self.max_ext < 0 else self.max_ext - self.base_seq + 1

    @property
    def lost(self) -> int:
        return self.expected - self.received

    def update(self, seq: int) -> str:
        """Count one arrival; returns "new", "late", "duplicate" or "bad" (jump held back)."""
        _check_range("sequence number", seq, 16)
        if self.max_ext < 0:
            self._restart(seq)
            return "new"
        delta = seq_diff(seq, self.max_ext % _SEQ_MOD)
        if 0 < delta <= MAX_DROPOUT:
            ext = self.max_ext + delta
            self.largest_seq_gap = max(self.largest_seq_gap, delta - 1)
            self._window = ((self._window << delta) | 1) & ((1 << _WINDOW) - 1)
            self.max_ext = ext
            self.received += 1
            return "new"
        if -MAX_MISORDER <= delta <= 0:
            age = -delta  # < _WINDOW since MAX_MISORDER is
            if self.max_ext - age < self.base_seq:  # before the stream's first packet
                self.base_seq = self.max_ext - age
                self._window |= 1 << age
                self.received += 1
                self.reordered += 1
                return "late"
            if self._window >> age & 1:
                self.duplicates += 1
                return "duplicate"
            self._window |= 1 << age
            self.received += 1
            self.reordered += 1
            return "late"
        # a very large jump: believe it only if the next packet follows it (A.1)
        if seq == self._bad_seq:
            self.resyncs += 1
            self._restart(seq_add(seq, -1))  # the held-back packet counts too
            return self.update(seq)
        self._bad_seq = seq_add(seq, 1)
        return "bad"

    def _restart(self, seq: int) -> None:
        # keep the counts; a restart begins a new extended range after the old one
        cycles = 0 if self.max_ext < 0 else (self.max_ext // _SEQ_MOD + 1) * _SEQ_MOD
        prev_expected, prev_received = self.expected, self.received
        self.max_ext = cycles + seq
        self.base_seq = self.max_ext - prev_expected  # expected carries over
        self.received = prev_received + 1
        self._window = 1
        self._bad_seq = -1


# --- RTCP (RFC 3550 6.4) ------------------------------------------------------------------

RTCP_SR, RTCP_RR, RTCP_SDES, RTCP_BYE, RTCP_APP = 200, 201, 202, 203, 204
_RTCP_HEAD = struct.Struct("!BBH")
_SR_INFO = struct.Struct("!IQIII")  # SSRC, NTP timestamp, RTP timestamp, packets, octets
NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900 to 1970


@dataclass(frozen=True)
class RtcpPacket:
    """One RTCP packet of a compound packet: header fields and the raw body."""

    packet_type: int
    count: int
    body: bytes

    def serialize(self) -> bytes:
        if len(self.body) % 4:
            raise ValueError(f"RTCP body must be a multiple of 4 bytes, got {len(self.body)}")
        _check_range("RTCP count", self.count, 5)
        return _RTCP_HEAD.pack(0x80 | self.count, self.packet_type,
                               len(self.body) // 4) + self.body


@dataclass(frozen=True)
class SenderReport:
    """RTCP SR without report blocks (a sender that does not receive)."""

    ssrc: int
    ntp_ns: int  # wall clock of the report, ns since 1970
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    report_blocks: tuple[bytes, ...] = field(default=())  # 24 bytes each, kept raw

    def serialize(self) -> bytes:
        secs, ns = divmod(self.ntp_ns, 1_000_000_000)
        ntp = ((secs + NTP_EPOCH_OFFSET) % _TS_MOD) << 32 | (ns << 32) // 1_000_000_000
        body = _SR_INFO.pack(self.ssrc, ntp, self.rtp_timestamp % _TS_MOD,
                             self.packet_count % _TS_MOD, self.octet_count % _TS_MOD)
        return RtcpPacket(RTCP_SR, len(self.report_blocks),
                          body + b"".join(self.report_blocks)).serialize()

    @classmethod
    def from_packet(cls, pkt: RtcpPacket) -> SenderReport:
        need = _SR_INFO.size + 24 * pkt.count
        if pkt.packet_type != RTCP_SR:
            raise ValueError(f"RTCP packet type {pkt.packet_type} is not a sender report")
        if len(pkt.body) < need:
            raise ValueError(f"RTCP SR too short: {len(pkt.body)} bytes < {need}")
        ssrc, ntp, ts, packets, octets = _SR_INFO.unpack_from(pkt.body)
        secs = (ntp >> 32) - NTP_EPOCH_OFFSET
        ns = ((ntp & 0xFFFF_FFFF) * 1_000_000_000) >> 32
        blocks = tuple(pkt.body[_SR_INFO.size + 24 * i:_SR_INFO.size + 24 * (i + 1)]
                       for i in range(pkt.count))
        return cls(ssrc, secs * 1_000_000_000 + ns, ts, packets, octets, blocks)


def parse_rtcp(data: bytes) -> list[RtcpPacket]:
    """Split a compound RTCP packet; ValueError if any part is malformed."""
    out: list[RtcpPacket] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _RTCP_HEAD.size:
            raise ValueError(f"RTCP header truncated at byte {pos}: "
                             f"{len(data) - pos} bytes < {_RTCP_HEAD.size}")
        b0, ptype, words = _RTCP_HEAD.unpack_from(data, pos)
        if b0 >> 6 != RTP_VERSION:
            raise ValueError(f"RTCP version {b0 >> 6} not supported")
        end = pos + 4 + 4 * words
        if end > len(data):
            raise ValueError(f"RTCP packet of {words} words exceeds datagram: "
                             f"{len(data)} bytes < {end}")
        body = bytes(data[pos + 4:end])
        if b0 & 0x20:  # padding, only legal on the last packet
            if end != len(data) or not body or not 0 < body[-1] <= len(body):
                raise ValueError("RTCP padding invalid")
            body = body[:-body[-1]]
        out.append(RtcpPacket(ptype, b0 & 0x1F, body))
        pos = end
    if not out:
        raise ValueError("RTCP datagram empty")
    return out


def looks_like_rtcp(data: bytes) -> bool:
    """RFC 5761 4: packet types 192..223 in the second byte mean RTCP."""
    return len(data) >= 2 and 192 <= data[1] <= 223
