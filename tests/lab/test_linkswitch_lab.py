"""Service migration II (Fig 4) in Mininet: A1 moves its call with B1 from `wlan` to `lte` —
planned (make before break), on carrier loss (port down) and on a silent blackhole (media
timeout); the two baselines; refusals that switch nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from experiments.control import NodeControl
from experiments.faults import FaultClient
from experiments.lab import Lab, read_jsonl, wait_until
from experiments.pcaps import sip_messages, tshark_fields
from nodes.ipsec.esp_sa import tshark_args
from topologies.m2m import address

pytestmark = pytest.mark.lab

WLAN, LTE, B1 = address("a1", "wlan"), address("a1", "lte"), address("b1", "netb")
PROXY = address("proxy", "core")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(name="test-link") as lab:
        lab.start_servers()
        lab.start_terminal("a1", auto_switch="proposed", media_timeout=0.3)
        lab.start_terminal("b1")
        lab.start_terminal("a2")
        yield lab


def n(lab: Lab, name: str) -> NodeControl:
    return lab.nodes[name]


def media(lab: Lab, name: str, cid: str) -> dict[str, Any]:
    return n(lab, name)("status")["calls"][cid]["media"]


def media_sas(lab: Lab, name: str) -> list[tuple[int, str | None]]:
    return sorted((sa["spi"], sa["selector"]) for sa in n(lab, name)("status")["ipsec"]["sas"]
                  if PROXY not in (sa["src"], sa["dst"]))


def fresh_call(lab: Lab) -> str:
    """A new a1 -> b1 call with a1 registered on wlan (re-registered there if it moved)."""
    for name in ("a1", "b1"):
        for cid in list(n(lab, name)("status")["calls"]):
            n(lab, name)("hangup", call_id=cid)
    assert n(lab, "a1")("register", via="a1-wlan")["status"] == 200
    assert n(lab, "b1")("register")["status"] == 200
    cid = n(lab, "a1")("call", to="b1")["call_id"]
    wait_until(lambda: cid in n(lab, "sms")("status")["sessions"], 10, "the SMS to learn it")
    wait_until(lambda: media(lab, "a1", cid)["rx"]["packets"] > 20, 10, "voice at a1")
    return cid


def on_lte(lab: Lab, cid: str) -> bool:
    return (media(lab, "a1", cid)["local"].startswith(LTE + ":")
            and media(lab, "b1", cid)["remote"].startswith(LTE + ":"))


def arrivals_from(lab: Lab, node: str, src: str, since_ns: int) -> int:
    assert lab.run_dir is not None
    return sum(1 for e in read_jsonl(lab.run_dir / "media" / f"{node}-media.jsonl")
               if e.get("event") == "rtp-rx" and e["src"].startswith(src + ":")
               and e["t_ns"] > since_ns)


def test_planned_switch_loses_no_rtp(lab: Lab) -> None:
    cid = fresh_call(lab)
    result = n(lab, "a1")("link_switch", via="a1-lte")
    assert result["method"] == "proposed" and result["sessions"] == [cid]
    assert on_lte(lab, cid)
    done_ns = max(e["t_ns"] for e in read_jsonl(lab.run_dir / "events" / "a1.jsonl")  # type: ignore[operator]
                  if e.get("event") == "fig4" and e.get("step") == "done")
    wait_until(lambda: arrivals_from(lab, "b1", LTE, done_ns) > 25, 10, "media from lte at b1")
    for name in ("a1", "b1"):
        rx = media(lab, name, cid)["rx"]
        assert rx["lost"] == 0 and rx["largest_seq_gap"] == 0, (name, rx)
    # Same keys, new address: a1's SAs now name 10.0.2.10 and nothing names wlan.
    assert all(WLAN not in (sel or "") for _, sel in media_sas(lab, "a1"))
    assert len(media_sas(lab, "a1")) == 2 and len(media_sas(lab, "b1")) == 2
    esp = wait_until(lambda: tshark_fields(lab.pcaps["a1-lte"],
                                           f"esp && ip.src=={LTE} && ip.dst=={B1}",
                                           ["esp.spi"]), 10, "ESP on a1-lte")
    assert {int(r[0], 16) for r in esp} == {media(lab, "a1", cid)["spi_out"]}
    assert not tshark_fields(lab.pcaps["a1-lte"], f"udp && ip.addr=={B1}", ["udp.srcport"])


@pytest.mark.parametrize(("kind", "cause"), [("down", "carrier-loss"),
                                             ("blackhole", "media-timeout")])
def test_fault_triggers_the_switch(lab: Lab, faults: FaultClient, kind: str,
                                   cause: str) -> None:
    cid = fresh_call(lab)
    fault = faults.inject("wlan", "wlan-a1", kind)
    wait_until(lambda: on_lte(lab, cid), 20, f"the switch after {kind}")
    assert lab.run_dir is not None
    triggers = [e for e in read_jsonl(lab.run_dir / "events" / "a1.jsonl")
                if e.get("event") == "trigger" and e["t_ns"] >= fault["t_ns"]]
    assert triggers and triggers[0]["cause"] == cause, triggers
    # Media resumes on interface 2, both ways, inside ESP.
    t = fault["t_ns"]
    wait_until(lambda: arrivals_from(lab, "b1", LTE, t) > 25, 10, "a1's media via lte at b1")
    wait_until(lambda: len(tshark_fields(
        lab.pcaps["a1-lte"], f"esp && ip.src=={B1} && frame.time_epoch > {t / 1e9}",
        ["esp.spi"])) > 25, 10, "b1's media in ESP on a1-lte")
    before = media(lab, "a1", cid)["rx"]["packets"]
    wait_until(lambda: media(lab, "a1", cid)["rx"]["packets"] > before + 10, 10,
               "b1's media received at a1")
    faults.restore(fault["id"])


def _sip_between(lab: Lab, start_ns: int, end_ns: int) -> int:
    assert lab.run_dir is not None
    msgs = sip_messages(lab.pcaps["proxy-core"], tshark_args(lab.run_dir / "esp_sa"))
    # Trigger to completion, and the completion's own answers just after it.
    return sum(1 for m in msgs if start_ns / 1e9 <= m["t"] <= end_ns / 1e9 + 0.4)  # type: ignore[operator]


def _window(lab: Lab, method: str) -> tuple[int, int]:
    assert lab.run_dir is not None
    steps = [e for e in read_jsonl(lab.run_dir / "events" / "a1.jsonl")
             if e.get("event") == "fig4" and e.get("method") == method]
    start = [e["t_ns"] for e in steps if e["step"] == "trigger"][-1]
    end = [e["t_ns"] for e in steps if e["step"] == "done"][-1]
    return start, end


def test_baselines_complete_and_the_proposal_needs_fewer_messages(lab: Lab) -> None:
    methods = ("proposed", "register-then-switch", "reinvite")
    for method in methods:
        cid = fresh_call(lab)
        assert n(lab, "a1")("link_switch", via="a1-lte", method=method)["method"] == method
        assert on_lte(lab, cid)
        end = _window(lab, method)[1]
        wait_until(lambda s=end: arrivals_from(lab, "b1", LTE, s) > 10, 10, "media via lte")
        time.sleep(0.6)  # the procedure's last answers land before the next call's signalling
    # Count once the capture holds the last window: a marker MESSAGE after it must show.
    assert lab.run_dir is not None
    last = _window(lab, methods[-1])[1]
    n(lab, "a1")("message", to="b1", text="marker")
    wait_until(lambda: any(m["t"] > last / 1e9 + 0.4 for m in sip_messages(  # type: ignore[operator]
        lab.pcaps["proxy-core"], tshark_args(lab.run_dir / "esp_sa"))), 10,
        "the capture to catch up")
    counts = {m: _sip_between(lab, *_window(lab, m)) for m in methods}
    # One REGISTER that is also the switch request saves the separate request's hops.
    assert 0 < counts["proposed"] < counts["register-then-switch"], counts


def test_refused_link_switches_switch_nothing(lab: Lab) -> None:
    cid = fresh_call(lab)
    before = {name: media_sas(lab, name) for name in ("a1", "b1")}
    sessions = n(lab, "sms")("status")["sessions"]
    unknown = json.dumps({"type": "link-switch", "sessions": ["no-such-call"]})
    assert n(lab, "a1")("register", via="a1-lte", body=unknown)["status"] == 200
    # The link-switch notice is the SMS's registration notice: it learns the address anyway.
    wait_until(lambda: n(lab, "sms")("status")["addresses"].get("a1") == LTE, 10,
               "the SMS to learn a1's lte address")
    with pytest.raises(Exception, match="400|refused"):
        n(lab, "a1")("register", via="a1-lte", body='{"type": "link-switch"}')
    theirs = json.dumps({"type": "link-switch", "sessions": [cid]})
    assert n(lab, "a2")("register", body=theirs)["status"] == 200  # not a2's session
    assert lab.run_dir is not None
    wait_until(lambda: sum(1 for e in read_jsonl(lab.run_dir / "events" / "sms.jsonl")
                           if e.get("event") == "refused" and e.get("type") == "link-switch")
               >= 2, 10, "the SMS to refuse both")
    assert n(lab, "sms")("status")["sessions"] == sessions
    for name in ("a1", "b1"):
        assert media_sas(lab, name) == before[name]
    assert media(lab, "a1", cid)["local"].startswith(WLAN + ":")
