"""RTP senders of a terminal: voice and video, re-targetable at run time.

* `VoiceSender` — the speech sample as PCMU (PT 0), 20 ms frames of 160 samples.
* `VideoSender` — a video-like stream: 30 frames/s around a bitrate, each frame split over
  packets of ≤ 1200 B payload sharing one 90 kHz timestamp, marker on the last one.

Both pace on the monotonic clock against an absolute schedule (no drift) and can be moved
at run time with `retarget(remote, local_ip)`: SSRC, sequence number and timestamp continue.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

from nodes.events import EventLog
from nodes.mediasock import IP_PKTINFO, Address, addr_text, check_address, check_ip, udp_socket
from nodes.rtp import RtpPacket, SenderReport, seq_add, ts_add
from nodes.speech import DEFAULT_SAMPLE, SAMPLE_RATE, load_pcm, ulaw_encode

PT_PCMU = 0
PT_VIDEO = 96
VOICE_FRAME = 160  # samples per 20 ms frame at 8 kHz
VIDEO_CLOCK = 90_000
MAX_PAYLOAD = 1200
MAX_LATE_FRAMES = 10  # further behind schedule than this: re-base instead of bursting


class Sender:
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
        self.local_ip = check_ip(local_ip or "0.0.0.0")
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
            self._sock = udp_socket((self.local_ip, local_port), f"{self.kind} sender")
        self._task: asyncio.Task[None] | None = None
        self._marker_next = True  # first packet of a talkspurt
        self._stopped = False
        self._failing = 0  # send errors since the last success

    # --- control ------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        self._emit("tx-start", remote=addr_text(self.remote), local=self._local_text(),
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
        new_local = self.local_ip if local_ip is None else check_ip(local_ip)
        old = {"remote": addr_text(self.remote), "local": self._local_text()}
        if new_local != self.local_ip:
            if self._shared:
                self.local_ip = new_local  # per-packet source address, same socket
            else:
                self._sock, self.local_ip = self._rebind(new_local), new_local
        self.remote = remote
        self._emit("retarget", old=old, remote=addr_text(remote), local=self._local_text(),
                   seq=self.seq, ts=self.timestamp)

    def _rebind(self, ip: str) -> socket.socket:
        what = f"{self.kind} sender"
        try:
            sock = udp_socket((ip, self.local_port), what)
        except ValueError:
            if not self.local_port:
                raise
            # a fixed port held on the wildcard address blocks a specific one: release it,
            # retry, and put the old socket back if the new address is unusable
            self._sock.close()
            try:
                return udp_socket((ip, self.local_port), what)
            except ValueError:
                self._sock = udp_socket((self.local_ip, self.local_port), what)
                raise
        self._sock.close()
        return sock

    def state(self) -> dict[str, Any]:
        """Where the stream is: enough to continue it elsewhere (next seq and timestamp)."""
        return {"ssrc": self.ssrc, "seq": self.seq, "ts": self.timestamp,
                "packets": self.packets, "octets": self.octets, "frames": self.frames,
                "errors": self.errors, "remote": addr_text(self.remote),
                "local": self._local_text()}

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
            return addr_text(self._sock.getsockname())
        except OSError:
            return f"{self.local_ip}:?"

    def _emit(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.emit(event, stream=self.name, **fields)


class VoiceSender(Sender):
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


class VideoSender(Sender):
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
