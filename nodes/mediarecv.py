"""The RTP receiver of a terminal: every packet logged, statistics, speech to a WAV.

RTP on a port and RTCP on port+1, every packet a JSON-lines event (arrival `t_ns`, seq,
timestamp, SSRC, PT, size, source, local interface via IP_PKTINFO), loss and gap
statistics, PCMU written to a WAV by RTP timestamp (lost frames become silence).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nodes.events import EventLog
from nodes.mediasend import PT_PCMU
from nodes.mediasock import Address, addr_text, check_ip, kernel_time, read_pktinfo, udp_socket
from nodes.rtp import (
    RTCP_SR,
    RtpPacket,
    SenderReport,
    SequenceTracker,
    looks_like_rtcp,
    parse_rtcp,
    ts_diff,
)
from nodes.speech import SAMPLE_RATE, TimelineWav, ulaw_decode


class _Source:
    """What the receiver knows about one SSRC."""

    def __init__(self, pt: int) -> None:
        self.pt = pt
        self.seq = SequenceTracker()
        self.packets = 0
        # WAV placement: sample position = pos_ref + (extended timestamp - that of ts_ref)
        self.ts_ref: int | None = None
        self.ext_ts = 0
        self.pos_ref = 0

    def summary(self) -> dict[str, Any]:
        s = self.seq
        return {"pt": self.pt, "packets": self.packets, "received": s.received,
                "expected": s.expected, "lost": s.lost, "duplicates": s.duplicates,
                "reordered": s.reordered, "largest_seq_gap": s.largest_seq_gap,
                "resyncs": s.resyncs}


class Receiver:
    """RTP on `port` (and RTCP on port+1) on `bind`; logs every packet; PCMU → `wav`.

    WAV timeline: the first PCMU SSRC's first packet is sample 0 and later packets sit at
    their RTP timestamp offset, so lost frames are silence and the file is as long as the
    sender's timeline. A new SSRC (another terminal) is anchored at its arrival time
    relative to the first packet, as is a timestamp jump of more than MAX_JUMP_S.
    """

    MAX_JUMP_S = 60

    def __init__(self, port: int, *, log: EventLog | None = None, wav: str | Path | None = None,
                 bind: str = "0.0.0.0", rtcp: bool = True, name: str = "rx",
                 log_packets: bool = True) -> None:
        if not 0 <= port < 65535:
            raise ValueError(f"RTP port must be 0..65534 (RTCP uses port+1), got {port}")
        check_ip(bind)
        self.log, self.name, self.log_packets = log, name, log_packets
        self._sock, self._rtcp = self._bind(bind, port, rtcp)
        self.port = self._sock.getsockname()[1]
        self._wav = TimelineWav(wav) if wav else None
        self._wav_t0: int | None = None
        self.sources: dict[int, _Source] = {}
        self.packets = self.bad = self.rtcp_packets = self.wav_dropped = 0
        self.per_iface: Counter[str] = Counter()
        self.per_source: Counter[str] = Counter()
        self.first_ns = self.last_ns = 0
        self.largest_gap_ns = self.largest_gap_end_ns = 0
        self._started = False

    @staticmethod
    def _bind(ip: str, port: int, rtcp: bool) -> tuple[socket.socket, socket.socket | None]:
        for _ in range(20 if port == 0 else 1):  # port 0: find a free even/odd pair
            sock = udp_socket((ip, port), "RTP receiver", pktinfo=True)
            if not rtcp:
                return sock, None
            try:
                ctl = udp_socket((ip, sock.getsockname()[1] + 1), "RTCP receiver",
                                  pktinfo=True)
            except ValueError:
                sock.close()
                if port:
                    raise
                continue
            return sock, ctl
        raise ValueError(f"no free RTP/RTCP port pair on {ip}")

    @property
    def rtp_socket(self) -> socket.socket:
        """The RTP socket, for a symmetric sender (`Sender(sock=...)`)."""
        return self._sock

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._sock.fileno(), self._drain, self._sock, False)
        if self._rtcp is not None:
            loop.add_reader(self._rtcp.fileno(), self._drain, self._rtcp, True)
        self._started = True
        self._emit("rx-start", port=self.port, rtcp=self._rtcp is not None,
                   wav=str(self._wav.path) if self._wav else None)

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        loop = asyncio.get_running_loop() if self._started else None
        for sock in (self._sock, self._rtcp):
            if sock is not None:
                if loop is not None:
                    loop.remove_reader(sock.fileno())
                sock.close()
        if self._wav is not None:
            self._wav.close()
        self._emit("rx-stop", **self.status())

    # --- packets ------------------------------------------------------------------------
    def _drain(self, sock: socket.socket, is_rtcp_port: bool) -> None:
        while True:
            try:
                data, anc, _, addr = sock.recvmsg(65535, 256)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ICMP error queued on the socket: keep going
                self._emit("rx-error", error=exc.strerror or str(exc))
                continue
            t_ns = kernel_time(anc) or time.time_ns()
            iface, dst = read_pktinfo(anc)
            if is_rtcp_port or looks_like_rtcp(data):
                self._on_rtcp(data, addr, iface, t_ns)
            else:
                self._on_rtp(data, addr, iface, dst, t_ns)

    def _on_rtp(self, data: bytes, addr: Address, iface: str, dst: str, t_ns: int) -> None:
        try:
            pkt = RtpPacket.parse(data)
        except ValueError as exc:
            self.bad += 1
            self._emit("rtp-bad", src=addr_text(addr), iface=iface, size=len(data), error=str(exc))
            return
        self.packets += 1
        if self.last_ns:
            gap = t_ns - self.last_ns
            if gap > self.largest_gap_ns:
                self.largest_gap_ns, self.largest_gap_end_ns = gap, t_ns
        else:
            self.first_ns = t_ns
        self.last_ns = t_ns
        self.per_iface[iface] += 1
        self.per_source[addr_text(addr)] += 1
        src = self.sources.get(pkt.ssrc)
        if src is None:
            src = self.sources[pkt.ssrc] = _Source(pkt.payload_type)
        src.packets += 1
        order = src.seq.update(pkt.seq)
        if self.log_packets:
            self._emit("rtp-rx", seq=pkt.seq, ts=pkt.timestamp, ssrc=pkt.ssrc,
                       pt=pkt.payload_type, m=pkt.marker, size=len(data),
                       src=addr_text(addr), dst=dst, iface=iface, order=order, t_ns=t_ns)
        if (self._wav is not None and pkt.payload_type == PT_PCMU and pkt.payload
                and order in ("new", "late")):
            self._write_voice(src, pkt, t_ns)

    def _write_voice(self, src: _Source, pkt: RtpPacket, t_ns: int) -> None:
        assert self._wav is not None
        if src.ts_ref is not None:
            step = ts_diff(pkt.timestamp, src.ts_ref)
            if abs(step) > self.MAX_JUMP_S * SAMPLE_RATE:
                src.ts_ref = None  # the sender's clock jumped: anchor again
        if src.ts_ref is None:
            if self._wav_t0 is None:
                self._wav_t0, src.pos_ref = t_ns, 0
            else:
                src.pos_ref = max(0, (t_ns - self._wav_t0) * SAMPLE_RATE // 1_000_000_000)
            src.ts_ref, src.ext_ts = pkt.timestamp, 0
        step = ts_diff(pkt.timestamp, src.ts_ref)
        position = src.pos_ref + src.ext_ts + step
        if step > 0:  # advance the reference so that wraparound never bites
            src.ts_ref, src.ext_ts = pkt.timestamp, src.ext_ts + step
        if position < 0:
            self.wav_dropped += 1
            return
        self._wav.write(position, ulaw_decode(pkt.payload))

    def _on_rtcp(self, data: bytes, addr: Address, iface: str, t_ns: int) -> None:
        self.rtcp_packets += 1
        try:
            parts = parse_rtcp(data)
        except ValueError as exc:
            self._emit("rtcp-bad", src=addr_text(addr), iface=iface, error=str(exc))
            return
        fields: dict[str, Any] = {"types": [p.packet_type for p in parts]}
        for part in parts:
            if part.packet_type == RTCP_SR:
                try:
                    sr = SenderReport.from_packet(part)
                except ValueError as exc:
                    fields["error"] = str(exc)
                else:
                    fields.update(ssrc=sr.ssrc, ts=sr.rtp_timestamp, packets=sr.packet_count,
                                  octets=sr.octet_count)
        self._emit("rtcp-rx", src=addr_text(addr), iface=iface, t_ns=t_ns, **fields)

    # --- results ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        trackers = [s.seq for s in self.sources.values()]
        return {
            "port": self.port, "packets": self.packets,
            "received": sum(t.received for t in trackers),
            "expected": sum(t.expected for t in trackers),
            "lost": sum(t.lost for t in trackers),
            "duplicates": sum(t.duplicates for t in trackers),
            "reordered": sum(t.reordered for t in trackers),
            "largest_seq_gap": max((t.largest_seq_gap for t in trackers), default=0),
            "largest_gap_ms": round(self.largest_gap_ns / 1e6, 3),
            "largest_gap_end_ns": self.largest_gap_end_ns or None,
            "first_arrival_ns": self.first_ns or None, "last_arrival_ns": self.last_ns or None,
            "bad": self.bad, "rtcp": self.rtcp_packets,
            "per_iface": dict(self.per_iface), "per_source": dict(self.per_source),
            "ssrcs": {str(k): v.summary() for k, v in self.sources.items()},
            "wav_samples": self._wav.samples if self._wav else None,
            "wav_dropped": self.wav_dropped,
        }

    def _emit(self, event: str, **fields: Any) -> None:
        # a `t_ns` field (the arrival time) replaces EventLog's own emission time
        if self.log is not None:
            self.log.emit(event, stream=self.name, **fields)
