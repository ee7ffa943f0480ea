"""RTP/RTCP packets: round trips, error texts, sequence arithmetic and loss accounting."""

from __future__ import annotations

import struct

import pytest

from nodes.rtp import (
    RTCP_BYE,
    RTCP_SR,
    RtcpPacket,
    RtpExtension,
    RtpPacket,
    SenderReport,
    SequenceTracker,
    looks_like_rtcp,
    parse_rtcp,
    seq_add,
    seq_diff,
    seq_gt,
    ts_add,
    ts_diff,
)


def test_minimal_packet_layout() -> None:
    pkt = RtpPacket(payload_type=0, seq=0x1234, timestamp=0xDEADBEEF, ssrc=0x01020304,
                    payload=b"\xff" * 4, marker=True)
    wire = pkt.serialize()
    assert wire[:12] == bytes.fromhex("80801234deadbeef01020304")
    assert wire[12:] == b"\xff" * 4
    assert RtpPacket.parse(wire) == pkt


@pytest.mark.parametrize("pkt", [
    RtpPacket(96, 65535, 0, 0xFFFFFFFF),
    RtpPacket(127, 1, 2**32 - 1, 7, b"abc", csrc=(1, 2, 2**32 - 1)),
    RtpPacket(0, 2, 3, 4, b"x" * 160, extension=RtpExtension(0xBEDE, b"\x10\xaa\x00\x00")),
    RtpPacket(0, 2, 3, 4, b"", extension=RtpExtension(0x1000)),
    RtpPacket(8, 9, 10, 11, b"payload", padding=1),
    RtpPacket(8, 9, 10, 11, b"payload", marker=True, csrc=tuple(range(15)),
              extension=RtpExtension(1, bytes(8)), padding=255),
])
def test_round_trip(pkt: RtpPacket) -> None:
    wire = pkt.serialize()
    again = RtpPacket.parse(wire)
    assert again == pkt
    assert again.serialize() == wire


def test_padding_and_extension_bits_on_wire() -> None:
    wire = RtpPacket(0, 1, 2, 3, b"ab", extension=RtpExtension(5, bytes(4)),
                     padding=3).serialize()
    assert wire[0] == 0x80 | 0x20 | 0x10
    assert wire[-3:] == b"\x00\x00\x03"
    assert len(wire) == 12 + 4 + 4 + 2 + 3


def _hdr(b0: int = 0x80, b1: int = 0) -> bytes:
    return bytes([b0, b1]) + struct.pack("!HII", 1, 2, 3)


@pytest.mark.parametrize(("data", "message"), [
    (b"\x80\x00\x00\x01\x00", "RTP packet too short: 5 bytes < 12"),
    (b"", "RTP packet too short: 0 bytes < 12"),
    (_hdr(0x40), "RTP version 1 not supported"),
    (_hdr(0x00), "RTP version 0 not supported"),
    (_hdr(0x83) + bytes(8), "RTP packet too short for 3 CSRCs: 20 bytes < 24"),
    (_hdr(0x90) + b"\x00\x01", "RTP extension header truncated: 14 bytes < 16"),
    (_hdr(0x90) + b"\x00\x01\x00\x02" + bytes(4),
     "RTP extension of 2 words exceeds packet: 20 bytes < 24"),
    (_hdr(0xA0) + b"abc\x05", "RTP padding 5 bytes longer than payload 4 bytes"),
    (_hdr(0xA0) + b"abc\x00", "RTP padding count 0 invalid"),
    (_hdr(0xA0), "RTP padding bit set but no payload"),
])
def test_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RtpPacket.parse(data)


def test_padding_may_fill_whole_payload() -> None:
    pkt = RtpPacket.parse(_hdr(0xA0) + b"\x00\x00\x00\x04")
    assert pkt.payload == b"" and pkt.padding == 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"payload_type": 128}, "RTP payload type 128 out of range 0..127"),
    ({"seq": 65536}, "RTP sequence number 65536 out of range"),
    ({"timestamp": -1}, "RTP timestamp -1 out of range"),
    ({"ssrc": 2**32}, "RTP SSRC 4294967296 out of range"),
    ({"csrc": tuple(range(16))}, "RTP CSRC list too long: 16 > 15"),
    ({"padding": 256}, "RTP padding length 256 out of range"),
])
def test_construction_errors(kwargs: dict, message: str) -> None:
    fields = {"payload_type": 0, "seq": 0, "timestamp": 0, "ssrc": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        RtpPacket(**fields)


def test_extension_must_be_whole_words() -> None:
    with pytest.raises(ValueError, match="multiple of 4 bytes, got 3"):
        RtpExtension(1, b"abc")


def test_sequence_arithmetic_wraps() -> None:
    assert seq_diff(0, 65535) == 1
    assert seq_diff(65535, 0) == -1
    assert seq_diff(5, 5) == 0
    assert seq_diff(32767, 0) == 32767
    assert seq_diff(32768, 0) == -32768
    assert seq_add(65535, 2) == 1
    assert seq_add(0, -1) == 65535
    assert seq_gt(1, 65500) and not seq_gt(65500, 1)
    assert ts_diff(10, 2**32 - 150) == 160
    assert ts_add(2**32 - 80, 160) == 80


def _feed(tracker: SequenceTracker, seqs: list[int]) -> list[str]:
    return [tracker.update(s) for s in seqs]


def test_tracker_in_order_across_wrap() -> None:
    t = SequenceTracker()
    seqs = [seq_add(65530, i) for i in range(20)]
    assert set(_feed(t, seqs)) == {"new"}
    assert (t.expected, t.received, t.lost) == (20, 20, 0)
    assert t.max_ext == 65536 + 13


def test_tracker_loss_every_tenth() -> None:
    t = SequenceTracker()
    seqs = [seq_add(65000, i) for i in range(1000) if i % 10 != 9]
    _feed(t, seqs)
    assert t.received == 900
    assert t.expected == 999  # the last one (index 999) was dropped: not yet expected
    assert t.lost == 99
    assert t.largest_seq_gap == 1


def test_tracker_duplicates_and_reorder() -> None:
    t = SequenceTracker()
    verdicts = _feed(t, [10, 11, 13, 12, 13, 11, 14, 9])
    assert verdicts == ["new", "new", "new", "late", "duplicate", "duplicate", "new", "late"]
    assert (t.received, t.duplicates, t.reordered, t.lost) == (6, 2, 2, 0)
    assert t.largest_seq_gap == 1


def test_tracker_large_jump_needs_confirmation() -> None:
    t = SequenceTracker()
    _feed(t, [100, 101, 102])
    assert t.update(40000) == "bad"
    assert (t.received, t.lost) == (3, 0)
    assert t.update(103) == "new"  # the stray packet is ignored
    assert t.update(50000) == "bad"
    assert t.update(50001) == "new"  # two in a row: the sender restarted
    assert t.resyncs == 1
    assert t.update(50002) == "new"
    assert (t.received, t.lost) == (7, 0)


def test_sender_report_round_trip() -> None:
    ns = 1_700_000_000_123_456_789
    sr = SenderReport(ssrc=0xCAFE, ntp_ns=ns, rtp_timestamp=12345, packet_count=50,
                      octet_count=8000)
    wire = sr.serialize()
    assert wire[1] == RTCP_SR and len(wire) == 28
    assert looks_like_rtcp(wire)
    (pkt,) = parse_rtcp(wire)
    back = SenderReport.from_packet(pkt)
    assert (back.ssrc, back.rtp_timestamp, back.packet_count, back.octet_count) == (
        0xCAFE, 12345, 50, 8000)
    assert abs(back.ntp_ns - ns) < 2  # NTP fraction has ~0.23 ns resolution


def test_rtcp_compound_and_errors() -> None:
    bye = RtcpPacket(RTCP_BYE, 1, struct.pack("!I", 7)).serialize()
    sr = SenderReport(1, 0, 0, 0, 0).serialize()
    parts = parse_rtcp(sr + bye)
    assert [p.packet_type for p in parts] == [RTCP_SR, RTCP_BYE]
    with pytest.raises(ValueError, match="RTCP header truncated at byte 28: 2 bytes < 4"):
        parse_rtcp(sr + b"\x80\xc8")
    with pytest.raises(ValueError, match="exceeds datagram: 12 bytes < 28"):
        parse_rtcp(sr[:12])
    with pytest.raises(ValueError, match="RTCP version 0 not supported"):
        parse_rtcp(b"\x00\xc8\x00\x00")
    with pytest.raises(ValueError, match="RTCP datagram empty"):
        parse_rtcp(b"")
    with pytest.raises(ValueError, match="not a sender report"):
        SenderReport.from_packet(parts[1])


def test_rtp_is_not_rtcp() -> None:
    assert not looks_like_rtcp(RtpPacket(0, 1, 2, 3, marker=True).serialize())
    assert not looks_like_rtcp(RtpPacket(96, 1, 2, 3, marker=True).serialize())
