"""Service migration I (Fig 3) in Mininet: A1–B1 voice becomes A2–B2 video through the SMS,
with key reuse then rekey, and the renegotiate-first baseline; refusals change nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from experiments.control import NodeControl, NodeError
from experiments.lab import Lab, read_jsonl, wait_until
from experiments.pcaps import sip_messages, tshark_fields
from nodes.ipsec.esp_sa import tshark_args
from topologies.m2m import address

pytestmark = pytest.mark.lab

TERMINALS = ("a1", "a2", "b1", "b2")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(name="test-smig") as lab:
        lab.start_servers()
        for name in TERMINALS:
            lab.start_terminal(name)
            assert lab.nodes[name]("register")["status"] == 200
        yield lab


def n(lab: Lab, name: str) -> NodeControl:
    return lab.nodes[name]


def media_spis(status: dict[str, Any]) -> set[int]:
    """SPIs of every SA that is not a registration SA (those name the proxy)."""
    proxy = address("proxy", "core")
    return {sa["spi"] for sa in status["ipsec"]["sas"] if proxy not in (sa["src"], sa["dst"])}


def snapshot(lab: Lab) -> dict[str, Any]:
    return {"sms": n(lab, "sms")("status")["sessions"],
            **{t: sorted(sa["spi"] for sa in n(lab, t)("status")["ipsec"]["sas"])
               for t in TERMINALS}}


def fig3_events(lab: Lab, since_ns: int) -> list[dict[str, Any]]:
    assert lab.run_dir is not None
    events = []
    for name in (*TERMINALS, "sms"):
        events += [e for e in read_jsonl(lab.run_dir / "events" / f"{name}.jsonl")
                   if e.get("event") == "fig3" and e["t_ns"] >= since_ns]
    return sorted(events, key=lambda e: e["t_ns"])


def end_all(lab: Lab) -> None:
    for sid in list(n(lab, "sms")("status")["sessions"]):
        owner = next(t for t in TERMINALS if sid in n(lab, t)("status")["sessions"])
        n(lab, owner)("end", session=sid)
    for name in TERMINALS:
        wait_until(lambda t=name: media_spis(n(lab, t)("status")) == set(), 10,
                   f"{name}'s media SAs to go")


def call(lab: Lab) -> str:
    result = n(lab, "a1")("call", to="b1")
    assert result["status"] == 200
    cid = result["call_id"]
    wait_until(lambda: cid in n(lab, "sms")("status")["sessions"], 10, "the SMS to learn it")
    wait_until(lambda: n(lab, "b1")("status")["calls"][cid]["media"]["rx"]["packets"] > 20, 10,
               "voice at b1")
    return cid


def test_voice_a1_b1_becomes_video_a2_b2(lab: Lab) -> None:
    cid = call(lab)
    before = n(lab, "a1")("status")["calls"][cid]["media"]
    t0 = time.time_ns()
    done = n(lab, "a1")("switch", call_id=cid, to="a2", media="video")
    assert done == {"session": cid, "terminals": ["a2", "b2"]}
    # A1 and B1 hand over: no dialog, no media SA left.
    for name in ("a1", "b1"):
        wait_until(lambda t=name: media_spis(n(lab, t)("status")) == set(), 10,
                   f"{name} to drop its media SAs")
        assert n(lab, name)("status")["calls"] == {}
    # A2 and B2 talk video, first on the reused SPIs, then (step 9) on new ones.
    for name in ("a2", "b2"):
        wait_until(lambda t=name: n(lab, t)("status")["sessions"][cid]["rx"]["packets"] > 30,
                   10, f"video at {name}")
    reused = {before["spi_out"], before["spi_in"]}
    wait_until(lambda: not (media_spis(n(lab, "a2")("status")) & reused)
               and not (media_spis(n(lab, "b2")("status")) & reused), 15,
               "the rekey to delete the reused SAs")
    a2 = n(lab, "a2")("status")["sessions"][cid]
    assert a2["kind"] == "video"
    assert {a2["spi_out"], a2["spi_in"]}.isdisjoint(reused)
    assert len(media_spis(n(lab, "a2")("status"))) == 2
    # No RTP lost at the new terminals, across the rekey.
    time.sleep(0.5)
    for name in ("a2", "b2"):
        rx = n(lab, name)("status")["sessions"][cid]["rx"]
        assert rx["lost"] == 0 and rx["largest_seq_gap"] == 0, rx
    # The old media kept flowing after the switch request, until the handover.
    assert lab.run_dir is not None
    b1_rx = [e["t_ns"] for e in read_jsonl(lab.run_dir / "media" / "b1-media.jsonl")
             if e.get("event") == "rtp-rx"]
    assert any(t > t0 for t in b1_rx)
    # Steps (1)-(9) in order, across all processes' event logs.
    firsts: dict[Any, int] = {}
    for e in fig3_events(lab, t0):
        firsts.setdefault(e["step"], e["t_ns"])
    order = [firsts[s] for s in (1, 2, 3, 4, 5, 6, 7, 9)]
    assert order == sorted(order), firsts
    # Media at A2 from B2: ESP, first with B2's reused SPI, then with a new one.
    esp = [int(r[0], 16) for r in tshark_fields(
        lab.pcaps["a2-wlan"], f"esp && ip.src=={address('b2', 'netb')}", ["esp.spi"])]
    assert esp[0] == before["spi_in"]  # a2 receives on the SPI a1 received on (reused)
    assert esp[-1] == a2["spi_in"] and esp[-1] not in reused
    assert not tshark_fields(lab.pcaps["a2-wlan"],
                             f"udp && ip.addr=={address('b2', 'netb')}", ["udp.srcport"])


def test_captured_sip_shows_the_steps_and_no_keys_to_b1(lab: Lab) -> None:
    assert lab.run_dir is not None
    msgs = sip_messages(lab.pcaps["proxy-core"], tshark_args(lab.run_dir / "esp_sa"),
                        'sip.Method == "MESSAGE"')
    smig = []
    for m in msgs:
        try:
            body = json.loads(m["body"])  # type: ignore[arg-type]
        except ValueError:
            continue
        smig.append((m["src"], m["dst"], body))
    kinds = [b["type"] for _, _, b in smig if b["type"] not in ("registration",)]
    for step in ("switch-request", "switch-response", "session-config", "switch-complete",
                 "switch-done", "rekey"):
        assert step in kinds, kinds
    assert kinds.index("switch-request") < kinds.index("switch-response") < \
        kinds.index("session-config") < kinds.index("switch-complete") < \
        kinds.index("switch-done") < kinds.index("rekey")
    b1 = address("b1", "netb")
    to_b1 = [b for _, dst, b in smig if dst == b1 and b["type"] == "switch-request"]
    from_a1 = [b for src, _, b in smig if src == address("a1", "wlan")
               and b["type"] == "switch-request"]
    assert to_b1 and all("keys" not in b and "security" not in b for b in to_b1)
    assert from_a1 and all("keys" in b and "security" in b for b in from_a1)
    # Every one of these crossed the wire inside ESP.
    assert all(m["esp"] for m in msgs)


def test_renegotiate_first_baseline(lab: Lab) -> None:
    end_all(lab)
    cid = call(lab)
    before = n(lab, "a1")("status")["calls"][cid]["media"]
    assert n(lab, "a1")("switch", call_id=cid, to="a2", media="video",
                        method="renegotiate")["terminals"] == ["a2", "b2"]
    wait_until(lambda: n(lab, "b2")("status")["sessions"][cid]["rx"]["packets"] > 30, 10,
               "video at b2")
    a2 = n(lab, "a2")("status")["sessions"][cid]
    assert {a2["spi_out"], a2["spi_in"]}.isdisjoint({before["spi_out"], before["spi_in"]})
    assert lab.run_dir is not None
    steps = [e for e in read_jsonl(lab.run_dir / "events" / "a2.jsonl")
             if e.get("event") == "fig3" and e.get("session") == cid]
    assert any(e["step"] == "negotiated" for e in steps)
    assert not any(e["step"] == 9 for e in steps)  # fresh keys: nothing to rekey
    end_all(lab)


def test_refusals_change_nothing(lab: Lab) -> None:
    end_all(lab)
    cid = call(lab)
    state = snapshot(lab)
    keys = n(lab, "a1")("export_keys", call_id=cid)

    def req(**fields: Any) -> str:
        return json.dumps({"type": "switch-request", "session": cid, "new-terminal": "a2",
                           "media": "video", **keys, **fields})

    cases = [
        ("a1", req(session="no-such-call"), 404),
        ("a2", req(), 403),  # not a participant
        ("a1", "{not json", 400),
        ("a1", req(**{"new-terminal": "b2"}), 403),  # not alice's terminal
        ("a1", json.dumps({"type": "switch-request", "session": cid, "new-terminal": "a2",
                           "media": "video"}), 400),  # key reuse without keys
    ]
    for sender, body, status in cases:
        reply = n(lab, sender)("send_smig", server="sms", body=body)
        assert reply["status"] == status, (body[:60], reply)
        assert snapshot(lab) == state
    # Mismatched keys: the SMS accepts the request, B1 answers with the real keys, step (4)
    # finds them different and refuses; nothing moves.
    bad = json.loads(json.dumps(keys))
    bad["keys"]["offer-to-answer"]["enc"] = "00" * 16
    assert n(lab, "a1")("send_smig", server="sms", body=req(**bad))["status"] == 200
    assert lab.run_dir is not None
    wait_until(lambda: any(e.get("event") == "switch-refused" and "Keys differ" in e["reason"]
                           for e in read_jsonl(lab.run_dir / "events" / "a1.jsonl")), 10,
               "the refusal to reach a1")
    assert snapshot(lab) == state
    with pytest.raises(NodeError, match="a2 is not a terminal of bob|not a terminal"):
        n(lab, "b1")("switch", call_id=cid, to="a2", media="video")
    assert snapshot(lab) == state
