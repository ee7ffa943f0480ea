"""RTP media of a terminal: re-targetable voice/video senders and a logging receiver.

* `VoiceSender` — the speech sample as PCMU (PT 0), 20 ms frames of 160 samples.
* `VideoSender` — a video-like stream: 30 frames/s around a bitrate, each frame split over
  packets of ≤ 1200 B payload sharing one 90 kHz timestamp, marker on the last one.
* `Receiver` — RTP on a port and RTCP on port+1, every packet a JSON-lines event (arrival
  `t_ns`, seq, timestamp, SSRC, PT, size, source, local interface via IP_PKTINFO), loss and
  gap statistics, PCMU written to a WAV by RTP timestamp (lost frames become silence).

Senders pace on the monotonic clock against an absolute schedule (no drift) and can be moved
at run time with `retarget(remote, local_ip)`: SSRC, sequence number and timestamp continue.
Manual use (see `main`)::

    python -m nodes.media send --to 10.0.3.10:4000 [--local 10.0.1.10] [--video] --seconds 10
    python -m nodes.media recv --port 4000 --wav out.wav --log events.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import random
import signal
import socket
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nodes.events import EventLog
from nodes.rtp import (
    RTCP_SR,
    RtpPacket,
    SenderReport,
    SequenceTracker,
    looks_like_rtcp,
    parse_rtcp,
    seq_add,
    ts_add,
    ts_diff,
)
from nodes.speech import (
    DEFAULT_SAMPLE,
    SAMPLE_RATE,
    TimelineWav,
    load_pcm,
    ulaw_decode,
    ulaw_encode,
)

PT_PCMU = 0
PT_VIDEO = 96
VOICE_FRAME = 160  # samples per 20 ms frame at 8 kHz
VIDEO_CLOCK = 90_000
MAX_PAYLOAD = 1200
MAX_LATE_FRAMES = 10  # further behind schedule than this: re-base instead of bursting
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")


def _kernel_time(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The SO_TIMESTAMPNS arrival time (wall clock, ns) of a received datagram, if any."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec
    return None

Address = tuple[str, int]


def check_address(remote: Address) -> Address:
    """(IPv4, port) or ValueError; shared by constructors and retarget."""
    try:
        ip, port = remote
        ipaddress.IPv4Address(ip)
    except (TypeError, ValueError):
        raise ValueError(f"expected (IPv4 address, port), got {remote!r}") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port!r}")
    return ip, port


def _check_ip(ip: str) -> str:
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        raise ValueError(f"local address must be IPv4, got {ip!r}") from None
    return ip


def _udp_socket(local: Address, what: str, pktinfo: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if pktinfo:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            # Kernel receive timestamps: arrival times that do not depend on when the event
            # loop gets round to reading (DESIGN §2: the receiver logs arrival times).
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind(local)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot bind {what} to {local[0]}:{local[1]}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class _Sender:
    """Common part of the senders: socket, pacing, RTP header state, RTCP SR, retarget."""

    payload_type = 0
    clock_rate = 8000
    frame_s = 0.02
    kind = "media"

    def __init__(self, remote: Address, *, local_ip: str | None = None, local_port: int = 0,
                 log: EventLog | None = None, name: str = "tx", ssrc: int | None = None,
                 seq: int | None = None, timestamp: int | None = None,
                 max_frames: int | None = None, rtcp_interval: float = 5.0,
                 log_packets: bool = False, sock: socket.socket | None = None) -> None:
        """`sock`: send through this (symmetric RTP: the receiver's own RTP socket, so that
        packets leave from the port the peer's IPsec policy names); it is not closed here,
        and `local_ip` then picks the source address per packet (IP_PKTINFO), not a bind."""
        self.remote = check_address(remote)
        self.local_ip = _check_ip(local_ip or "0.0.0.0")
        if not 0 <= local_port < 65536:
            raise ValueError(f"local port must be 0..65535, got {local_port}")
        self.local_port = local_port
        self.log = log
        self.name = name
        rng = random.SystemRandom()  # RFC 3550: random initial SSRC, seq and timestamp
        self.ssrc = rng.getrandbits(32) if ssrc is None else ssrc
        self.seq = rng.getrandbits(16) if seq is None else seq
        self.timestamp = rng.getrandbits(32) if timestamp is None else timestamp
        RtpPacket(self.payload_type, self.seq, self.timestamp, self.ssrc)  # validates
        self.max_frames = max_frames
        self.rtcp_interval = rtcp_interval
        self.log_packets = log_packets
        self.packets = self.octets = self.frames = self.errors = 0
        self._shared = sock is not None
        if sock is not None:
            self._sock = sock
            self.local_port = sock.getsockname()[1]
        else:
            self._sock = _udp_socket((self.local_ip, local_port), f"{self.kind} sender")
        self._task: asyncio.Task[None] | None = None
        self._marker_next = True  # first packet of a talkspurt
        self._stopped = False
        self._failing = 0  # send errors since the last success

    # --- control ------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        self._emit("tx-start", remote=_fmt(self.remote), local=self._local_text(),
                   ssrc=self.ssrc, seq=self.seq, ts=self.timestamp, pt=self.payload_type)

    async def wait(self) -> None:
        """Until the sender ends by itself (end of media, max_frames) or is stopped."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock.fileno() >= 0 and not self._stopped:
            self._stopped = True
            state = self.state()
            if not self._shared:
                self._sock.close()
            self._emit("tx-stop", **state)

    def retarget(self, remote: Address, local_ip: str | None = None) -> None:
        """Send the next packet to `remote`, from `local_ip` if given ("0.0.0.0" = any).

        Takes effect between frames; SSRC, seq and timestamp continue. Bad input raises
        ValueError and leaves the sender as it was.
        """
        if self._sock.fileno() < 0 or self._stopped:
            raise ValueError(f"{self.name} is stopped: nothing to retarget")
        remote = check_address(remote)
        new_local = self.local_ip if local_ip is None else _check_ip(local_ip)
        old = {"remote": _fmt(self.remote), "local": self._local_text()}
        if new_local != self.local_ip:
            if self._shared:
                self.local_ip = new_local  # per-packet source address, same socket
            else:
                self._sock, self.local_ip = self._rebind(new_local), new_local
        self.remote = remote
        self._emit("retarget", old=old, remote=_fmt(remote), local=self._local_text(),
                   seq=self.seq, ts=self.timestamp)

    def _rebind(self, ip: str) -> socket.socket:
        what = f"{self.kind} sender"
        try:
            sock = _udp_socket((ip, self.local_port), what)
        except ValueError:
            if not self.local_port:
                raise
            # a fixed port held on the wildcard address blocks a specific one: release it,
            # retry, and put the old socket back if the new address is unusable
            self._sock.close()
            try:
                return _udp_socket((ip, self.local_port), what)
            except ValueError:
                self._sock = _udp_socket((self.local_ip, self.local_port), what)
                raise
        self._sock.close()
        return sock

    def state(self) -> dict[str, Any]:
        """Where the stream is: enough to continue it elsewhere (next seq and timestamp)."""
        return {"ssrc": self.ssrc, "seq": self.seq, "ts": self.timestamp,
                "packets": self.packets, "octets": self.octets, "frames": self.frames,
                "errors": self.errors, "remote": _fmt(self.remote), "local": self._local_text()}

    # --- the paced loop -----------------------------------------------------------------
    def _frame(self) -> list[bytes] | None:
        """Payloads of the next frame (None: media ended)."""
        raise NotImplementedError

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        next_rtcp = start + self.rtcp_interval
        n = 0
        while self.max_frames is None or n < self.max_frames:
            payloads = self._frame()
            if payloads is None:
                break
            for i, payload in enumerate(payloads):
                self._send(payload, self._marker(i, len(payloads)))
            self.timestamp = ts_add(self.timestamp, round(self.frame_s * self.clock_rate))
            self.frames += 1
            n += 1
            now = loop.time()
            if self.rtcp_interval > 0 and now >= next_rtcp:
                self._send_sr()
                next_rtcp = now + self.rtcp_interval
            delay = start + n * self.frame_s - now
            if delay < -MAX_LATE_FRAMES * self.frame_s:  # stalled: don't burst to catch up
                self._emit("pacing-resync", late_ms=round(-delay * 1000, 1))
                start, delay = now - n * self.frame_s, 0.0
            await asyncio.sleep(max(0.0, delay))
        self._emit("tx-end", **self.state())

    def _marker(self, index: int, count: int) -> bool:
        marker, self._marker_next = self._marker_next, False
        return marker

    def _send(self, payload: bytes, marker: bool) -> None:
        pkt = RtpPacket(self.payload_type, self.seq, self.timestamp, self.ssrc, payload, marker)
        try:
            if self._shared and self.local_ip != "0.0.0.0":
                info = struct.pack("I4s4s", 0, socket.inet_aton(self.local_ip), bytes(4))
                self._sock.sendmsg([pkt.serialize()], [(socket.IPPROTO_IP, IP_PKTINFO, info)],
                                   0, self.remote)
            else:
                self._sock.sendto(pkt.serialize(), self.remote)
        except OSError as exc:  # e.g. no route while a link is down: the seq still advances
            self.errors += 1
            if not self._failing:
                self._emit("tx-error", seq=self.seq, error=exc.strerror or str(exc))
            self._failing += 1
        else:
            if self._failing:
                self._emit("tx-resumed", seq=self.seq, failed=self._failing)
                self._failing = 0
            self.packets += 1
            self.octets += len(payload)
            if self.log_packets:
                self._emit("rtp-tx", seq=self.seq, ts=self.timestamp, m=marker,
                           size=len(payload))
        self.seq = seq_add(self.seq, 1)

    def _send_sr(self) -> None:
        sr = SenderReport(self.ssrc, time.time_ns(), self.timestamp, self.packets, self.octets)
        with contextlib.suppress(OSError):  # RTCP is best effort
            self._sock.sendto(sr.serialize(), (self.remote[0], self.remote[1] + 1))

    def _local_text(self) -> str:
        if self._shared:
            return f"{self.local_ip}:{self.local_port}"
        try:
            return _fmt(self._sock.getsockname())
        except OSError:
            return f"{self.local_ip}:?"

    def _emit(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.emit(event, stream=self.name, **fields)


class VoiceSender(_Sender):
    """PCMU speech, 20 ms frames; loops the sample unless `loop=False` (then ends with it)."""

    payload_type = PT_PCMU
    clock_rate = SAMPLE_RATE
    frame_s = VOICE_FRAME / SAMPLE_RATE
    kind = "voice"

    def __init__(self, remote: Address, *, sample: str | Path = DEFAULT_SAMPLE,
                 loop: bool = True, pcm: bytes | None = None, **kwargs: Any) -> None:
        self._ulaw = ulaw_encode(load_pcm(sample) if pcm is None else pcm)  # encode once
        if not self._ulaw:
            raise ValueError("voice sample is empty")
        self.loop = loop
        self._pos = 0
        super().__init__(remote, name=kwargs.pop("name", "voice"), **kwargs)

    def _frame(self) -> list[bytes] | None:
        data, pos = self._ulaw, self._pos
        if pos >= len(data):
            if not self.loop:
                return None
            pos = 0
        frame = data[pos:pos + VOICE_FRAME]
        if self.loop and len(frame) < VOICE_FRAME:  # wrap around into the next loop
            frame += data[:VOICE_FRAME - len(frame)]
        self._pos = pos + VOICE_FRAME
        if self.loop:
            self._pos %= len(data)
        return [frame]  # the last frame of a non-looped sample may be short


class VideoSender(_Sender):
    """Video-like frames: a key frame (×2.5) every `gop` frames, sizes ±20 % around the mean
    for `bitrate`; payload ≤ MAX_PAYLOAD per packet; marker on the last packet of a frame."""

    payload_type = PT_VIDEO
    clock_rate = VIDEO_CLOCK
    frame_s = 1 / 30
    kind = "video"

    def __init__(self, remote: Address, *, bitrate: int = 300_000, gop: int = 30,
                 **kwargs: Any) -> None:
        if not 10_000 <= bitrate <= 50_000_000:
            raise ValueError(f"video bitrate must be 10 kbit/s..50 Mbit/s, got {bitrate}")
        if gop < 1:
            raise ValueError(f"gop must be ≥ 1, got {gop}")
        self.bitrate, self.gop = bitrate, gop
        mean = bitrate / 8 / 30
        self._base = mean * gop / (gop + 1.5)  # so that key frames keep the mean at bitrate
        self._rng = random.Random(0x5EED)  # reproducible sizes
        self._filler = bytes(range(256)) * (MAX_PAYLOAD // 256 + 1)
        super().__init__(remote, name=kwargs.pop("name", "video"), **kwargs)

    def _frame(self) -> list[bytes]:
        key = self.frames % self.gop == 0
        size = max(1, round(self._base * (2.5 if key else 1) * self._rng.uniform(0.8, 1.2)))
        count = -(-size // MAX_PAYLOAD)
        # even split; each payload starts with frame number, index and count (for eyes in
        # Wireshark, not parsed by anyone)
        out = []
        for i in range(count):
            part = size // count + (1 if i < size % count else 0)
            head = struct.pack("!IBB", self.frames & 0xFFFFFFFF, i, count)[:part]
            out.append(head + self._filler[:part - len(head)])
        return out

    def _marker(self, index: int, count: int) -> bool:
        return index == count - 1


def _fmt(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}"


def _pktinfo(anc: list[tuple[int, int, bytes]]) -> tuple[str, str]:
    """(interface name, local destination address) from IP_PKTINFO."""
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            index = struct.unpack_from("I", data)[0]
            dst = socket.inet_ntoa(data[8:12])  # ipi_addr: the header's destination
            try:
                return socket.if_indextoname(index), dst
            except OSError:
                return str(index), dst
    return "?", "?"


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
        _check_ip(bind)
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
            sock = _udp_socket((ip, port), "RTP receiver", pktinfo=True)
            if not rtcp:
                return sock, None
            try:
                ctl = _udp_socket((ip, sock.getsockname()[1] + 1), "RTCP receiver",
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
        """The RTP socket, for a symmetric sender (`_Sender(sock=...)`)."""
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
            t_ns = _kernel_time(anc) or time.time_ns()
            iface, dst = _pktinfo(anc)
            if is_rtcp_port or looks_like_rtcp(data):
                self._on_rtcp(data, addr, iface, t_ns)
            else:
                self._on_rtp(data, addr, iface, dst, t_ns)

    def _on_rtp(self, data: bytes, addr: Address, iface: str, dst: str, t_ns: int) -> None:
        try:
            pkt = RtpPacket.parse(data)
        except ValueError as exc:
            self.bad += 1
            self._emit("rtp-bad", src=_fmt(addr), iface=iface, size=len(data), error=str(exc))
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
        self.per_source[_fmt(addr)] += 1
        src = self.sources.get(pkt.ssrc)
        if src is None:
            src = self.sources[pkt.ssrc] = _Source(pkt.payload_type)
        src.packets += 1
        order = src.seq.update(pkt.seq)
        if self.log_packets:
            self._emit("rtp-rx", seq=pkt.seq, ts=pkt.timestamp, ssrc=pkt.ssrc,
                       pt=pkt.payload_type, m=pkt.marker, size=len(data),
                       src=_fmt(addr), dst=dst, iface=iface, order=order, t_ns=t_ns)
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
            self._emit("rtcp-bad", src=_fmt(addr), iface=iface, error=str(exc))
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
        self._emit("rtcp-rx", src=_fmt(addr), iface=iface, t_ns=t_ns, **fields)

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


# --- command line -------------------------------------------------------------------------

def _hostport(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IPV4:PORT, got {text!r}")
    try:
        return check_address((host, int(port)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


async def _cli(args: argparse.Namespace, log: EventLog) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control = None
    if args.control:
        from nodes.control import ControlServer  # only the CLI needs it
        control = ControlServer(args.control, args.node)
    sender: _Sender | None = None
    receiver: Receiver | None = None
    if args.mode == "send":
        common = {"log": log, "rtcp_interval": args.rtcp_interval}
        if args.video:
            sender = VideoSender(args.to, local_ip=args.local, local_port=args.local_port,
                                 bitrate=args.bitrate, log_packets=args.log_packets, **common)
        else:
            sender = VoiceSender(args.to, local_ip=args.local, local_port=args.local_port,
                                 sample=args.sample, loop=not args.once,
                                 log_packets=args.log_packets, **common)
        sender.start()
        ended = loop.create_task(sender.wait())
        ended.add_done_callback(lambda _: stop.set())
    else:
        receiver = Receiver(args.port, log=log, wav=args.wav, bind=args.bind,
                            log_packets=not args.quiet)
        receiver.start()
    if control is not None:
        await _control_commands(control, sender, receiver, stop)
        await control.start()
    try:
        await asyncio.wait_for(stop.wait(), args.seconds or None)
    except TimeoutError:
        pass
    finally:
        if control is not None:
            await control.close()
        if sender is not None:
            await sender.stop()
        if receiver is not None:
            receiver.close()


async def _control_commands(control: Any, sender: _Sender | None, receiver: Receiver | None,
                            stop: asyncio.Event) -> None:
    from nodes.control import CommandError

    async def retarget(to: str, local: str | None = None) -> dict[str, Any]:
        assert sender is not None
        try:
            sender.retarget(_hostport(to), local)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise CommandError(str(exc)) from None
        return sender.state()

    async def status() -> dict[str, Any]:
        if sender is not None:
            return sender.state()
        assert receiver is not None
        return receiver.status()

    async def stop_cmd() -> str:
        stop.set()
        return "stopping"

    control.command("status", status, help="sender state or receiver statistics")
    control.command("stop", stop_cmd, help="stop and exit")
    if sender is not None:
        control.command("retarget", retarget, {"to": str}, {"local": str},
                        help="send to IPV4:PORT from local address (continuing seq/ts)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.media",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    send = sub.add_parser("send", help="send voice (PCMU) or video-like RTP")
    send.add_argument("--to", type=_hostport, required=True, help="IPV4:PORT of the receiver")
    send.add_argument("--local", help="local IPv4 address to send from (default: any)")
    send.add_argument("--local-port", type=int, default=0)
    send.add_argument("--video", action="store_true", help="video-like stream (PT 96)")
    send.add_argument("--bitrate", type=int, default=300_000, help="video bit/s")
    send.add_argument("--sample", default=str(DEFAULT_SAMPLE), help="8 kHz mono 16-bit WAV")
    send.add_argument("--once", action="store_true", help="voice: stop at the sample's end")
    send.add_argument("--log-packets", action="store_true", help="log every sent packet")
    send.add_argument("--rtcp-interval", type=float, default=5.0, help="SR period, 0 = off")
    recv = sub.add_parser("recv", help="receive, log every packet, write PCMU to a WAV")
    recv.add_argument("--port", type=int, required=True)
    recv.add_argument("--bind", default="0.0.0.0")
    recv.add_argument("--wav", help="write received PCMU speech here")
    recv.add_argument("--quiet", action="store_true", help="no per-packet events")
    for p in (send, recv):
        p.add_argument("--log", help="JSON-lines event log (default: stdout)")
        p.add_argument("--seconds", type=float, default=0, help="stop after this long")
        p.add_argument("--node", default=socket.gethostname(), help="node name in the log")
        p.add_argument("--control", help="Unix socket for retarget/status/stop commands")
    args = parser.parse_args(argv)
    log = EventLog(args.node, args.log)
    try:
        asyncio.run(_cli(args, log))
    except ValueError as exc:  # bad address, port in use, unreadable sample
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
