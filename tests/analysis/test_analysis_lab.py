"""A real run folder analysed end to end: a1 calls b1, switches its link to lte (planned,
proposed method), the trial is written to trials.jsonl as the runner would, and analyze()
must find the switch in the decrypted captures: handover > 0, messages > 0, no RTP lost."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from experiments.analysis import analyze
from experiments.lab import Lab, read_jsonl, wait_until
from topologies.m2m import address

pytestmark = pytest.mark.lab

LTE = address("a1", "lte")
B1 = address("b1", "netb")


def arrivals_from(run_dir: Path, node: str, src: str, since_ns: int) -> int:
    return sum(1 for e in read_jsonl(run_dir / "media" / f"{node}-media.jsonl")
               if e.get("event") == "rtp-rx" and e["src"].startswith(src + ":")
               and e["t_ns"] > since_ns)


def test_analyze_a_planned_link_switch() -> None:
    with Lab(name="test-analysis") as lab:
        assert lab.run_dir is not None
        run = lab.run_dir
        lab.start_servers()
        a1, b1 = lab.start_terminal("a1"), lab.start_terminal("b1")
        assert a1("register", via="a1-wlan")["status"] == 200
        assert b1("register")["status"] == 200
        cid = a1("call", to="b1")["call_id"]
        wait_until(lambda: cid in lab.nodes["sms"]("status")["sessions"], 10,
                   "the SMS to learn the call")
        wait_until(lambda: a1("status")["calls"][cid]["media"]["rx"]["packets"] > 20, 10,
                   "voice at a1")
        t_start = time.time_ns()
        wait_until(lambda: a1("status")["calls"][cid]["media"]["rx"]["packets"] > 30, 10,
                   "more voice before the switch")
        t_trigger = time.time_ns()
        assert a1("link_switch", via="a1-lte")["method"] == "proposed"
        wait_until(lambda: arrivals_from(run, "b1", LTE, t_trigger) > 25, 10,
                   "media from lte at b1")
        # Both receivers must have voice after the switch, however slow b1 is to follow it.
        wait_until(lambda: arrivals_from(run, "a1", B1, t_trigger) > 25, 10,
                   "media from b1 at a1 after the switch")
        t_end = time.time_ns()
        for name in ("a1", "b1"):
            for call in list(lab.nodes[name]("status")["calls"]):
                lab.nodes[name]("hangup", call_id=call)
    # The lab is down: captures are complete.
    trial = {"scenario": "link-planned", "family": "link", "method": "proposed", "trial": 1,
             "session": cid, "t_start_ns": t_start, "t_trigger_ns": t_trigger,
             "t_end_ns": t_end, "mover": "a1", "peer": "b1", "old": {"a": "a1", "b": "b1"},
             "new": {"a": "a1", "b": "b1"},
             "addresses": {"a1": address("a1", "wlan"), "a1_new": LTE,
                           "b1": B1, "a2": address("a2", "wlan"),
                           "b2": address("b2", "netb")}, "ok": True, "error": None}
    failed = {"scenario": "link-planned", "method": "proposed", "trial": 2, "ok": False,
              "error": "made up for the test"}
    (run / "trials.jsonl").write_text(json.dumps(trial) + "\n" + json.dumps(failed) + "\n")

    summary = analyze(run)
    assert not summary["problems"], summary["problems"]
    (res,) = summary["trials"]
    assert [f["trial"] for f in summary["failed"]] == [2]
    assert res["handover_ms"] > 0 and res["signalling_ms"] > 0
    assert res["detection_ms"] == 0.0
    assert res["messages"] > 0 and res["bytes"] > 0
    labels = [m["label"] for m in res["message_list"]]
    assert "REGISTER link-switch" in labels and "MESSAGE switch-complete" in labels
    assert set(res["receivers"]) == {"a1", "b1"}
    for rx in res["receivers"].values():
        assert rx["packets"] > 20 and rx["lost"] == 0 and rx["gap_ms"] > 0
        assert rx["events"]["lost"] == 0
    counts = {c["metric"]: c for c in res["checks"]}
    assert counts["switch-complete messages"]["agree"] is True
    (agg,) = [a for a in summary["aggregates"] if a["method"] == "proposed"]
    assert agg["trials"] == 1 and agg["failed"] == 1
    assert summary["claims"]["c"]["verdict"] in ("inconclusive", "does not hold")  # 1 trial
    assert summary["claims"]["a"]["verdict"] == "not measured"
    for name in ("results.json", "results.csv", "results-trials.csv", "results.md"):
        assert (run / name).stat().st_size > 0
    assert "| link-planned | proposed | 1 (+1 failed) |" in (run / "results.md").read_text()

    # Decrypted signalling carries nonces and keys: none of it in the cache or the results.
    keys = {k.lower() for row in (run / "esp_sa").read_text().splitlines()
            for k in re.findall(r'"0x([0-9a-fA-F]{32,})"', row)}
    assert keys
    derived = [*(run / "analysis").iterdir(), *run.glob("results*")]
    for path in derived:
        text = path.read_text().lower()
        assert not [k for k in keys if k in text], path.name
        assert not re.search(r"m2m-key:[a-z0-9+/]{22}==", text), path.name

    from experiments.ladder import draw_ladders
    from experiments.plots import draw_plots
    pngs = draw_plots(run, summary) + draw_ladders(run, summary)
    assert {p.name for p in pngs} >= {"timeline-link-planned-proposed.png",
                                      "gap-cdf-link.png", "ladder-link-planned-proposed.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
