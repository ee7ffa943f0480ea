"""analyze() end to end on a synthetic run folder (no lab, no root): pcaps written with scapy
(plain UDP: no esp_sa file), event and media logs, trials.jsonl. Every expected number is
known by construction: a 170 ms gap with one packet lost at b1, the handover 150 ms after the
trigger, the procedure's SIP at the proxy with one retransmission, and a media log that is
late by 3 ms at one point (a disagreement to report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw
from scapy.utils import wrpcap

from experiments.analysis import analyze

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")

T0 = 1_800_000_000_000_000_000
MS = 1_000_000
A1, A1_NEW, B1, A2 = "10.0.1.10", "10.0.2.10", "10.0.3.10", "10.0.1.20"
PROXY, SMS = "10.0.0.10", "10.0.0.11"
SESSION = "call-1@10.0.1.10"


def rtp(t: int, src: str, dst: str, seq: int, ssrc: int, sport: int, dport: int) -> Any:
    header = bytes([0x80, 0]) + seq.to_bytes(2, "big") + (seq * 160).to_bytes(4, "big") \
        + ssrc.to_bytes(4, "big")
    pkt = IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(header + b"\xff" * 160)
    pkt.time = t / 1e9
    return pkt


def sip(t: int, src: str, dst: str, start: str, cid: str, cseq: str, body: dict | None = None
        ) -> Any:
    text = json.dumps(body) if body else ""
    msg = (f"{start}\r\nVia: SIP/2.0/UDP {src}:5060;branch=z9hG4bK{cid}{cseq.split()[0]}\r\n"
           f"From: <sip:x@m2m.example>;tag=1\r\nTo: <sip:y@m2m.example>\r\nCall-ID: {cid}\r\n"
           f"CSeq: {cseq}\r\n"
           + ("Content-Type: application/smig+json\r\n" if body else "")
           + f"Content-Length: {len(text)}\r\n\r\n{text}")
    pkt = IP(src=src, dst=dst) / UDP(sport=5060, dport=5060) / Raw(msg.encode())
    pkt.time = t / 1e9
    return pkt


def req(method: str, uri: str = "sip:sms@m2m.example") -> str:
    return f"{method} {uri} SIP/2.0"


OK = "SIP/2.0 200 OK"


def build_run(run: Path) -> None:
    for d in ("pcaps", "events", "media"):
        (run / d).mkdir(parents=True)
    # a1 -> b1 voice: old path until +280 ms, seq 115 lost, new path from +450 ms.
    to_b1 = [(T0 + k * 20 * MS, A1, 100 + k) for k in range(15)]
    to_b1 += [(T0 + 450 * MS + k * 20 * MS, A1_NEW, 116 + k) for k in range(15)]
    # b1 -> a1: continuous, wlan then lte, seq wrapping past 65535.
    to_a1 = [(T0 + k * 20 * MS, 65530 + k) for k in range(36)]
    b1_pkts = [rtp(t, s, B1, q, 0xA1, 4000, 5000) for t, s, q in to_b1]
    a1_wlan = [rtp(t, B1, A1, q % 65536, 0xB1, 5000, 4000) for t, q in to_a1 if t < T0 + 300 * MS]
    a1_lte = [rtp(t, B1, A1_NEW, q % 65536, 0xB1, 5000, 4000) for t, q in to_a1
              if t >= T0 + 300 * MS]
    sc = {"type": "switch-complete", "session": SESSION}
    reg = {"type": "link-switch", "sessions": [SESSION]}
    cfg = {"type": "link-config", "session": SESSION}
    proxy = [
        sip(T0 + 100 * MS, B1, PROXY, req("MESSAGE"), "before", "1 MESSAGE", {"type": "x"}),
        sip(T0 + 301 * MS, A1_NEW, PROXY, req("REGISTER", "sip:m2m.example"), "r", "1 REGISTER",
            reg),
        sip(T0 + 302 * MS, PROXY, A1_NEW, "SIP/2.0 401 Unauthorized", "r", "1 REGISTER"),
        sip(T0 + 303 * MS, A1_NEW, PROXY, req("REGISTER", "sip:m2m.example"), "r", "2 REGISTER",
            reg),
        sip(T0 + 353 * MS, A1_NEW, PROXY, req("REGISTER", "sip:m2m.example"), "r", "2 REGISTER",
            reg),  # retransmission
        sip(T0 + 355 * MS, PROXY, A1_NEW, OK, "r", "2 REGISTER"),
        sip(T0 + 356 * MS, A2, PROXY, req("MESSAGE"), "foreign", "1 MESSAGE", {"type": "x"}),
        sip(T0 + 360 * MS, SMS, PROXY, req("MESSAGE", "sip:a1@m2m.example"), "c1", "1 MESSAGE",
            cfg),
        sip(T0 + 361 * MS, PROXY, A1_NEW, req("MESSAGE", "sip:a1@m2m.example"), "c1",
            "1 MESSAGE", cfg),
        sip(T0 + 370 * MS, A1_NEW, PROXY, OK, "c1", "1 MESSAGE"),
        sip(T0 + 371 * MS, PROXY, SMS, OK, "c1", "1 MESSAGE"),
        sip(T0 + 401 * MS, A1_NEW, PROXY, req("MESSAGE"), "s1", "1 MESSAGE", sc),
        sip(T0 + 421 * MS, B1, PROXY, req("MESSAGE"), "s2", "1 MESSAGE", sc),
        sip(T0 + 425 * MS, PROXY, B1, OK, "s2", "1 MESSAGE"),
        sip(T0 + 600 * MS, PROXY, A1_NEW, OK, "s1", "1 MESSAGE"),  # late answer: counted
        sip(T0 + 610 * MS, B1, PROXY, req("MESSAGE"), "after", "1 MESSAGE", {"type": "x"}),
    ]
    # The terminals' own captures hold what they sent (the switch-completes).
    wrpcap(str(run / "pcaps" / "b1-netb.pcap"),
           sorted([*b1_pkts, proxy[12]], key=lambda p: float(p.time)))
    wrpcap(str(run / "pcaps" / "a1-wlan.pcap"), a1_wlan)
    wrpcap(str(run / "pcaps" / "a1-lte.pcap"), sorted([*a1_lte, proxy[1], proxy[11]],
                                                      key=lambda p: float(p.time)))
    wrpcap(str(run / "pcaps" / "proxy-core.pcap"), proxy)
    events = {
        "a1": [(300 * MS + 50_000, {"event": "fig4", "step": "trigger", "cause": "command",
                                    "sessions": [SESSION]}),
               (300 * MS + 90_000, {"event": "fig4", "step": "register"}),
               (400 * MS + 600_000, {"event": "fig4", "step": "switch-complete",
                                     "session": SESSION}),
               (470 * MS, {"event": "fig4", "step": "done"})],
        "b1": [(418 * MS, {"event": "fig4", "step": "switch-complete", "session": SESSION})],
    }
    for node, rows in events.items():
        (run / "events" / f"{node}.jsonl").write_text("".join(
            json.dumps({"t_ns": T0 + dt, "node": node, **e}) + "\n" for dt, e in rows))
    # Media logs: arrivals 0.2 ms after the wire; b1's first new-path packet 3 ms late.
    sas = {"t_ns": T0, "event": "fig2-media-sas", "local": f"{B1}:5000",
           "remote": f"{A1}:4000"}
    b1_rx = [{"t_ns": t + 200_000 + (3 * MS if q == 116 else 0), "event": "rtp-rx", "seq": q,
              "ssrc": 0xA1, "src": f"{s}:4000", "dst": B1} for t, s, q in to_b1]
    a1_rx = [{"t_ns": t + 200_000, "event": "rtp-rx", "seq": q % 65536, "ssrc": 0xB1,
              "src": f"{B1}:5000", "dst": A1} for t, q in to_a1]
    (run / "media" / "b1-media.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in [sas, *b1_rx]))
    (run / "media" / "a1-media.jsonl").write_text("".join(json.dumps(e) + "\n" for e in a1_rx))
    trial = {"scenario": "link-planned", "family": "link", "method": "proposed", "trial": 1,
             "session": SESSION, "t_start_ns": T0 - MS, "t_trigger_ns": T0 + 300 * MS,
             "t_end_ns": T0 + 800 * MS, "mover": "a1", "peer": "b1",
             "old": {"a": "a1", "b": "b1"}, "new": {"a": "a1", "b": "b1"},
             "addresses": {"a1": A1, "a1_new": A1_NEW, "b1": B1, "a2": A2}, "ok": True,
             "error": None}
    (run / "trials.jsonl").write_text(json.dumps(trial) + "\n" + "not json\n")


def test_analyze_synthetic_run(tmp_path: Path) -> None:
    build_run(tmp_path)
    summary = analyze(tmp_path)
    assert summary["problems"] == ["trials.jsonl line 2: Expecting value: line 1 column 1 "
                                   "(char 0)"]
    (res,) = summary["trials"]
    b1, a1 = res["receivers"]["b1"], res["receivers"]["a1"]
    assert (b1["packets"], b1["lost"], b1["gap_ms"]) == (30, 1, 170.0)
    assert (a1["packets"], a1["lost"], a1["gap_ms"]) == (36, 0, 20.0)  # across wraparound
    assert res["handover_ms"] == 150.0 and res["detection_ms"] == 0.0
    # Signalling: trigger event (+300.05) -> b1's switch-complete on the wire (+421).
    assert res["signalling_ms"] == 120.95 and res["signalling_source"] == "pcap"
    # REGISTER, 401, REGISTER, 200, link-config x2, 200 x2, switch-complete x2, 200 x2;
    # not: the message before the trigger, a2's, the one after completion.
    assert (res["messages"], res["retransmissions"]) == (12, 1)
    assert res["message_list"][0]["label"] == "REGISTER link-switch"
    assert res["message_list"][0]["src"] == "a1" and res["message_list"][0]["dst"] == "proxy"
    checks = {c["metric"]: c for c in res["checks"]}
    assert checks["RTP lost at b1"]["agree"] is True
    assert checks["media gap at b1"]["agree"] is False  # the log's arrival is 3 ms late
    assert checks["first RTP on the new path"]["diff_ms"] == -3.2
    assert "pcap is 3.200 ms earlier" in checks["first RTP on the new path"]["note"]
    assert checks["last switch-complete sent"]["agree"] is False  # b1 logged it 3 ms early
    assert checks["switch-complete messages"]["agree"] is True
    assert summary["claims"]["c"]["verdict"] == "does not hold"
    md = (tmp_path / "results.md").read_text()
    assert "| link-planned | proposed | 1 |" in md and "disagreement" in md
    # A second analysis reads the tshark cache and gives the same answer.
    assert analyze(tmp_path, write=False)["trials"][0]["messages"] == 12
