"""Senders and receiver over 127.0.0.1 in one asyncio loop: sequence facts, WAV, retarget, loss.

No timing assertions: only counts, sequence numbers, timestamps and file contents. Waits poll
with timeouts.
"""

from __future__ import annotations

import asyncio
import json
import math
import wave
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodes.events import EventLog
from nodes.media import MAX_PAYLOAD, Receiver, VideoSender, VoiceSender
from nodes.rtp import RtcpPacket, RtpPacket, SenderReport, seq_add, ts_add
from nodes.speech import SAMPLE_RATE, TimelineWav, load_pcm

LO = "127.0.0.1"


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the timeout")
        await asyncio.sleep(0.01)


def events(path: Path, event: str, stream: str | None = None) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == event and (stream is None or rec.get("stream") == stream):
            out.append(rec)
    return out


def tone(samples: int) -> bytes:
    """A 1 kHz tone that is never zero on a sample: lost frames stand out as zeros."""
    return array("h", [(8000 if i % 2 else -8000) + int(6000 * math.sin(i * math.pi / 4))
                       for i in range(samples)]).tobytes()


def wav_samples(path: Path) -> list[int]:
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return list(array("h", w.readframes(w.getnframes())))


def test_voice_whole_sample(tmp_path: Path) -> None:
    logp, wavp = tmp_path / "ev.jsonl", tmp_path / "rx.wav"
    pcm = load_pcm()[: 2 * 8080]  # 1.01 s: 50 full frames and a short one of 80 samples

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        log = EventLog("t", str(logp))
        rx = Receiver(0, log=log, wav=wavp)
        rx.start()
        tx = VoiceSender((LO, rx.port), pcm=pcm, loop=False, log=log, rtcp_interval=0.3)
        tx.start()
        await tx.wait()
        await until(lambda: rx.packets >= tx.packets)
        await tx.stop()
        rx.close()
        log.close()
        return tx.state(), rx.status()

    tx_state, status = asyncio.run(run())
    rx_events = events(logp, "rtp-rx")
    assert len(rx_events) == 51 == tx_state["packets"]
    first = events(logp, "tx-start")[0]
    for i, ev in enumerate(rx_events):
        assert ev["seq"] == seq_add(first["seq"], i)
        assert ev["ts"] == ts_add(first["ts"], 160 * i)
        assert ev["m"] == (i == 0)  # marker only on the first packet of the talkspurt
        assert (ev["pt"], ev["ssrc"], ev["iface"], ev["dst"], ev["order"]) == (
            0, first["ssrc"], "lo", LO, "new")
        assert ev["size"] == 12 + (80 if i == 50 else 160)
    assert [ev["t_ns"] for ev in rx_events] == sorted(ev["t_ns"] for ev in rx_events)
    assert (status["lost"], status["received"], status["duplicates"]) == (0, 51, 0)
    assert status["per_iface"] == {"lo": 51}
    assert status["largest_gap_ms"] > 0 and status["last_arrival_ns"] == rx_events[-1]["t_ns"]
    assert status["rtcp"] >= 1 and events(logp, "rtcp-rx")[0]["types"] == [200]
    assert events(logp, "tx-end")[0]["seq"] == seq_add(first["seq"], 51)
    samples = wav_samples(wavp)
    assert abs(len(samples) - 8080) <= 160  # the sample's length within one frame
    assert len(samples) == 8080  # (in fact exactly, the short last frame included)
    # µ-law is lossy but close: compare with the original within µ-law's step at that level
    original = array("h", pcm)
    assert max(abs(a - b) - abs(b) // 16 for a, b in zip(samples, original, strict=True)) <= 8


def test_retarget_keeps_sequence(tmp_path: Path) -> None:
    logp = tmp_path / "ev.jsonl"

    async def run() -> tuple[VoiceSender, Receiver, Receiver]:
        log = EventLog("t", str(logp))
        rx1 = Receiver(0, log=log, name="rx1")
        rx2 = Receiver(0, log=log, name="rx2")
        rx1.start()
        rx2.start()
        tx = VoiceSender((LO, rx1.port), pcm=tone(1600), max_frames=60, log=log,
                         rtcp_interval=0)
        tx.start()
        await until(lambda: rx1.packets >= 20)
        tx.retarget((LO, rx2.port), local_ip="127.0.0.2")
        await tx.wait()
        await until(lambda: rx1.packets + rx2.packets >= 60)
        await tx.stop()
        rx1.close()
        rx2.close()
        log.close()
        return tx, rx1, rx2

    tx, rx1, rx2 = asyncio.run(run())
    one, two = events(logp, "rtp-rx", "rx1"), events(logp, "rtp-rx", "rx2")
    assert len(one) + len(two) == 60 and len(one) >= 20 and two
    both = one + two
    start = events(logp, "tx-start")[0]
    assert [e["seq"] for e in both] == [seq_add(start["seq"], i) for i in range(60)]
    assert [e["ts"] for e in both] == [ts_add(start["ts"], 160 * i) for i in range(60)]
    assert {e["ssrc"] for e in both} == {tx.ssrc}
    assert {e["src"].split(":")[0] for e in one} == {LO}
    assert {e["src"].split(":")[0] for e in two} == {"127.0.0.2"}
    assert {e["dst"] for e in two} == {LO}
    (ret,) = events(logp, "retarget")
    assert ret["seq"] == two[0]["seq"] and ret["local"].startswith("127.0.0.2:")
    assert ret["old"]["remote"] == f"{LO}:{rx1.port}"
    assert rx1.status()["lost"] == 0 and rx2.status()["lost"] == 0
    assert not any(e["m"] for e in two)  # the stream continues: not a new talkspurt


def test_retarget_bad_input_leaves_sender_unchanged() -> None:
    async def run() -> None:
        tx = VoiceSender((LO, 9), pcm=tone(320), rtcp_interval=0)
        before = tx.state()
        for remote, local, message in [
            (("300.1.1.1", 5), None, "expected \\(IPv4 address, port\\)"),
            ((LO, 0), None, "port must be 1..65535, got 0"),
            ((LO, 5), "not-an-ip", "local address must be IPv4"),
            ((LO, 5), "192.0.2.77", "cannot bind voice sender to 192.0.2.77:0"),
        ]:
            with pytest.raises(ValueError, match=message):
                tx.retarget(remote, local)  # type: ignore[arg-type]
            assert tx.state() == before
        with pytest.raises(ValueError, match="local port must be 0..65535, got 70000"):
            VoiceSender((LO, 9), pcm=tone(320), local_port=70000)
        await tx.stop()
        with pytest.raises(ValueError, match="voice is stopped"):
            tx.retarget((LO, 5))

    asyncio.run(run())


def test_retarget_with_fixed_local_port() -> None:
    async def run() -> None:
        probe = Receiver(0, rtcp=False)  # find a free port, then give it to the sender
        port = probe.port
        probe.close()
        tx = VoiceSender((LO, 9), pcm=tone(320), local_port=port, rtcp_interval=0)
        assert tx.state()["local"] == f"0.0.0.0:{port}"
        tx.retarget((LO, 9), local_ip="127.0.0.2")  # wildcard → specific on the same port
        assert tx.state()["local"] == f"127.0.0.2:{port}"
        with pytest.raises(ValueError, match=f"cannot bind voice sender to 192.0.2.77:{port}"):
            tx.retarget((LO, 9), local_ip="192.0.2.77")
        assert tx.state()["local"] == f"127.0.0.2:{port}"
        tx.retarget((LO, 9), local_ip="0.0.0.0")
        assert tx.state()["local"] == f"0.0.0.0:{port}"
        await tx.stop()

    asyncio.run(run())


def test_video_frames_split_with_marker_on_last(tmp_path: Path) -> None:
    logp = tmp_path / "ev.jsonl"

    async def run() -> VideoSender:
        log = EventLog("t", str(logp))
        rx = Receiver(0, log=log)
        rx.start()
        tx = VideoSender((LO, rx.port), bitrate=600_000, max_frames=12, log=log,
                         rtcp_interval=0)
        tx.start()
        await tx.wait()
        await until(lambda: rx.packets >= tx.packets)
        await tx.stop()
        rx.close()
        log.close()
        return tx

    tx = asyncio.run(run())
    rx_events = events(logp, "rtp-rx")
    assert len(rx_events) == tx.packets
    frames: dict[int, list[dict[str, Any]]] = {}
    for ev in rx_events:
        frames.setdefault(ev["ts"], []).append(ev)
    assert len(frames) == 12
    start = events(logp, "tx-start")[0]
    assert list(frames) == [ts_add(start["ts"], 3000 * i) for i in range(12)]  # 90 kHz, 30/s
    assert [e["seq"] for e in rx_events] == [seq_add(start["seq"], i)
                                             for i in range(len(rx_events))]
    for packets in frames.values():
        assert [p["m"] for p in packets] == [False] * (len(packets) - 1) + [True]
        assert all(p["pt"] == 96 and p["size"] <= 12 + MAX_PAYLOAD for p in packets)
    assert min(len(p) for p in frames.values()) >= 2  # 600 kbit/s: ≥ 2500 B per frame
    assert len(frames[start["ts"]]) >= 4  # the key frame is 2.5× larger


class _LossyRelay(asyncio.DatagramProtocol):
    """Forwards datagrams to `dest`, dropping the 5th, 15th, 25th, ... (1-based)."""

    def __init__(self, dest: tuple[str, int]) -> None:
        self.dest, self.count, self.dropped = dest, 0, []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.count += 1
        if self.count % 10 == 5:
            self.dropped.append(RtpPacket.parse(data).seq)
            return
        assert self.transport is not None
        self.transport.sendto(data, self.dest)


def test_loss_accounting_and_silence(tmp_path: Path) -> None:
    logp, wavp = tmp_path / "ev.jsonl", tmp_path / "rx.wav"

    async def run() -> tuple[_LossyRelay, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        log = EventLog("t", str(logp))
        rx = Receiver(0, log=log, wav=wavp)
        rx.start()
        transport, relay = await loop.create_datagram_endpoint(
            lambda: _LossyRelay((LO, rx.port)), local_addr=(LO, 0))
        tx = VoiceSender(transport.get_extra_info("sockname"), pcm=tone(100 * 160),
                         loop=False, log=log, rtcp_interval=0)
        tx.start()
        await tx.wait()
        await until(lambda: rx.packets >= 90)
        await tx.stop()
        transport.close()
        rx.close()
        log.close()
        return relay, rx.status()

    relay, status = asyncio.run(run())
    assert relay.count == 100 and len(relay.dropped) == 10
    assert (status["expected"], status["received"], status["lost"]) == (100, 90, 10)
    assert status["lost"] / status["expected"] == 0.10
    assert status["largest_seq_gap"] == 1
    assert status["largest_gap_ms"] > 0
    seqs = {e["seq"] for e in events(logp, "rtp-rx")}
    assert seqs.isdisjoint(relay.dropped) and len(seqs) == 90
    samples = wav_samples(wavp)
    assert len(samples) == 100 * 160  # lost frames keep their place on the timeline
    silent = [f for f in range(100) if not any(samples[160 * f:160 * (f + 1)])]
    assert silent == [4 + 10 * k for k in range(10)]


def test_receiver_survives_garbage_and_rtcp(tmp_path: Path) -> None:
    logp = tmp_path / "ev.jsonl"

    async def run() -> dict[str, Any]:
        log = EventLog("t", str(logp))
        rx = Receiver(0, log=log)
        rx.start()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                           local_addr=(LO, 0))
        sr = SenderReport(7, 0, 0, 1, 2).serialize()
        transport.sendto(b"\x80\x00\x00", (LO, rx.port))  # too short
        transport.sendto(b"\x40" + bytes(11), (LO, rx.port))  # version 1
        transport.sendto(sr, (LO, rx.port))  # RTCP multiplexed on the RTP port
        transport.sendto(sr, (LO, rx.port + 1))
        transport.sendto(b"\x81\xc8\x00\x09", (LO, rx.port + 1))  # truncated RTCP
        transport.sendto(RtcpPacket(200, 0, bytes(4)).serialize(), (LO, rx.port + 1))
        transport.sendto(RtpPacket(0, 1, 2, 3, b"\xff" * 160).serialize(), (LO, rx.port))
        await until(lambda: rx.packets == 1 and rx.bad == 2 and rx.rtcp_packets == 4)
        transport.close()
        rx.close()
        log.close()
        return rx.status()

    status = asyncio.run(run())
    assert (status["packets"], status["bad"], status["rtcp"]) == (1, 2, 4)
    bad = [e["error"] for e in events(logp, "rtp-bad")]
    assert bad == ["RTP packet too short: 3 bytes < 12", "RTP version 1 not supported"]
    assert [e.get("ssrc") for e in events(logp, "rtcp-rx")] == [7, 7, None]
    assert "exceeds datagram" in events(logp, "rtcp-bad")[0]["error"]
    assert "RTCP SR too short" in events(logp, "rtcp-rx")[2]["error"]


def test_receiver_bad_ports() -> None:
    with pytest.raises(ValueError, match="RTP port must be 0..65534"):
        Receiver(65535)
    with pytest.raises(ValueError, match="local address must be IPv4"):
        Receiver(0, bind="nowhere")
    taken = Receiver(0, rtcp=False)
    try:
        with pytest.raises(ValueError, match=f"cannot bind RTP receiver to 0.0.0.0:{taken.port}"):
            Receiver(taken.port)
    finally:
        taken.close()


def test_timeline_wav_holes_are_silence(tmp_path: Path) -> None:
    path = tmp_path / "t.wav"
    wav = TimelineWav(path)
    wav.write(320, array("h", [1000] * 160).tobytes())
    wav.write(0, array("h", [-5] * 160).tobytes())  # late packet: earlier position
    with pytest.raises(ValueError, match="before the start"):
        wav.write(-1, b"\0\0")
    wav.close()
    samples = wav_samples(path)
    assert len(samples) == 480
    assert samples[:160] == [-5] * 160 and samples[160:320] == [0] * 160
    assert samples[320:] == [1000] * 160
