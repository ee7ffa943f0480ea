"""Analysis of a run folder (DESIGN §2 "Measurements").

Per trial: the media gap and RTP loss at each receiver, the handover time with its detection
and signalling parts, the SIP messages of the procedure at the proxy (each hop, retransmissions
apart) and the rekey time — measured from the decrypted captures and cross-checked against the
event logs (they must agree within 1 ms; a disagreement is recorded with who is off and by how
much, never fatal). Then statistics per scenario x method, the paper's claims checked against
them, and results.json / results.csv / results-trials.csv / results.md in the run folder.

The run's records (trials.jsonl, event logs) are read by experiments.records, its captures
by experiments.rundata: tshark once per pcap for all trials (in parallel, cached under
<run>/analysis/).
CLI: ``python -m experiments.analysis RUN_DIR`` (re)analyses a run and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from itertools import pairwise
from pathlib import Path
from typing import Any

from experiments.capture import (  # noqa: F401  (re-exported: the analysis API)
    Capture,
    CaptureError,
    Rtp,
    Sip,
    epoch_ns,
    esp_sa_options,
    load_capture,
    parse_tshark_row,
    run_tshark,
    tshark_unescape,
)
from experiments.claims import claims
from experiments.claims import markdown as claims_markdown
from experiments.records import (  # noqa: F401  (re-exported: the analysis API)
    FAULT_SCENARIOS,
    METHOD_ORDER,
    SCENARIO_ORDER,
    RunLogs,
    Trial,
    load_trials,
    read_jsonl,
)
from experiments.rundata import RunData, load_run, missing_logs, node_names
from nodes.rtp import seq_diff

AGREE_NS = 1_000_000  # pcaps and event logs must agree within 1 ms
VERDICTS = ("holds", "does not hold", "not measured")


# ---------------------------------------------------------------------------------------------
# Pure measurements (unit-tested on synthetic input).


def longest_gap(times_ns: Iterable[int]) -> tuple[int, int] | None:
    """(longest interval between consecutive arrivals, time the gap ended); None if < 2."""
    ts = sorted(times_ns)
    if len(ts) < 2:
        return None
    return max((b - a, b) for a, b in pairwise(ts))


def rtp_loss(packets: Iterable[tuple[int, int]]) -> dict[str, int]:
    """(ssrc, seq) in arrival order -> expected/received/lost/duplicates, sequence numbers
    extended across 16-bit wraparound per SSRC (loss = holes between the first and last)."""
    state: dict[int, dict[str, Any]] = {}
    dups = 0
    for ssrc, seq in packets:
        s = state.get(ssrc)
        if s is None:
            state[ssrc] = {"last": seq, "ext": seq, "lo": seq, "hi": seq, "seen": {seq}}
            continue
        ext = s["ext"] + seq_diff(seq, s["last"])
        s["last"], s["ext"] = seq, ext
        if ext in s["seen"]:
            dups += 1
        s["seen"].add(ext)
        s["lo"], s["hi"] = min(s["lo"], ext), max(s["hi"], ext)
    expected = sum(s["hi"] - s["lo"] + 1 for s in state.values())
    received = sum(len(s["seen"]) for s in state.values())
    return {"expected": expected, "received": received, "lost": expected - received,
            "duplicates": dups, "ssrcs": len(state)}


def split_retransmissions(msgs: Iterable[Sip]) -> tuple[list[Sip], list[Sip]]:
    """(first transmissions, retransmissions) in order."""
    seen: set[tuple[Any, ...]] = set()
    first, again = [], []
    for m in msgs:
        key = m.retrans_key()
        (again if key in seen else first).append(m)
        seen.add(key)
    return first, again


def procedure_messages(msgs: Sequence[Sip], t0: int, t1: int, t_end: int,
                       related: Any = None) -> dict[str, Any]:
    """SIP messages of a procedure at one observation point: the requests sent in [t0, t1]
    (that `related(msg)` accepts), every response to them up to t_end, and the ACK of each
    INVITE among them up to t_end (an ACK to a 2xx is a transaction of its own, sent after
    the 200 that may have ended [t0, t1]; it still belongs to the INVITE's exchange)."""
    ok = related or (lambda m: True)
    txns = {m.transaction() for m in msgs if m.is_request and t0 <= m.t_ns <= t1 and ok(m)}
    acks = {(cid, n, "ACK") for cid, n, method in txns if method == "INVITE"}

    def belongs(m: Sip) -> bool:
        if m.transaction() in acks:
            return t0 <= m.t_ns
        return m.transaction() in txns and (not m.is_request or t0 <= m.t_ns <= t1)

    chosen = [m for m in msgs if m.t_ns <= t_end and belongs(m)]
    first, again = split_retransmissions(chosen)
    return {"messages": len(first), "bytes": sum(m.size for m in first),
            "retransmissions": len(again), "retransmitted_bytes": sum(m.size for m in again),
            "first": first, "retransmitted": again}


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None}
    return {"n": len(xs), "median": percentile(xs, 50), "p95": percentile(xs, 95),
            "min": min(xs), "max": max(xs)}


def agreement(metric: str, pcap_ns: int | None, events_ns: int | None,
              duration: bool = False) -> dict[str, Any]:
    """A cross-check of the same instant (or `duration`) from the capture and the logs."""
    out: dict[str, Any] = {"metric": metric, "pcap_ms": _ms(pcap_ns), "events_ms": _ms(events_ns),
                           "duration": duration}
    if pcap_ns is None or events_ns is None:
        missing = "pcap" if pcap_ns is None else "events"
        out.update(agree=None, note=f"not in the {missing}")
        return out
    diff = pcap_ns - events_ns
    out.update(diff_ms=_ms(diff), agree=abs(diff) <= AGREE_NS)
    if abs(diff) > AGREE_NS:
        more, less = ("longer", "shorter") if duration else ("later", "earlier")
        out["note"] = (f"pcap is {abs(diff) / 1e6:.3f} ms "
                       f"{more if diff > 0 else less} than the events")
    return out


def _ms(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


# ---------------------------------------------------------------------------------------------
# One trial.


def _first(rows: Sequence[Any]) -> Any:
    return rows[0] if rows else None


def _count_check(metric: str, pcap: int | None, events: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"metric": metric, "pcap": pcap, "events": events,
                           "agree": None if pcap is None or events is None else pcap == events}
    if out["agree"] is False:
        out["note"] = f"pcap counts {pcap}, the events {events}"
    return out


def _receivers(trial: Trial, data: RunData, checks: list[dict[str, Any]]
               ) -> dict[str, dict[str, Any]]:
    sides = trial.sides()
    out: dict[str, dict[str, Any]] = {}
    for side, terms in sides.items():
        senders = {a for s, ts in sides.items() if s != side for t in ts for a in trial.addrs(t)}
        t0, t1 = trial.t_start_ns, trial.t_end_ns
        pcap: list[Rtp] = []
        events: list[Rtp] = []
        for term in terms:
            mine = trial.addrs(term)
            pcap += [r for r in data.rtp(term, t0, t1) if r.dst in mine and r.src in senders]
            events += [r for r in data.rtp_rx(term, t0, t1) if r.src in senders]
        pcap.sort(key=lambda r: r.t_ns)
        events.sort(key=lambda r: r.t_ns)
        name = "/".join(terms)
        gap, ev_gap = longest_gap(r.t_ns for r in pcap), longest_gap(r.t_ns for r in events)
        loss, ev_loss = rtp_loss((r.ssrc, r.seq) for r in pcap), rtp_loss(
            (r.ssrc, r.seq) for r in events)
        out[name] = {
            "terminals": terms, "packets": len(pcap),
            "gap_ms": _ms(gap[0]) if gap else None,
            "gap_end_ms": _ms(gap[1] - trial.t_trigger_ns) if gap else None,
            **{k: loss[k] for k in ("lost", "expected", "duplicates", "ssrcs")},
            "events": {"packets": len(events), "gap_ms": _ms(ev_gap[0]) if ev_gap else None,
                       "lost": ev_loss["lost"]},
        }
        checks.append(agreement(f"media gap at {name}", gap[0] if gap else None,
                                ev_gap[0] if ev_gap else None, duration=True))
        checks.append(_count_check(f"RTP lost at {name}", loss["lost"] if pcap else None,
                                   ev_loss["lost"] if events else None))
    return out


def _handover_path(trial: Trial) -> tuple[list[str], set[str], set[str] | None]:
    """(receiving terminals, new source addresses, receiving addresses or None = any)."""
    sides = trial.sides()
    mover_side = next((s for s, t in trial.old.items() if t == trial.mover), None)
    if mover_side is None:
        raise ValueError(f"mover {trial.mover!r} is none of the old terminals {trial.old}")
    other = [s for s in sides if s != mover_side]
    if trial.family == "terminal":
        mover_new, peer_new = trial.new[mover_side], trial.new[other[0]]
        return [peer_new], trial.addrs(mover_new), trial.addrs(peer_new)
    new_addr = trial.addresses.get(f"{trial.mover}_new")
    if not new_addr:
        raise ValueError(f"addresses has no {trial.mover}_new (the mover's new address)")
    return [t for s in other for t in sides[s]], {new_addr}, None


def _smig_sent(trial: Trial, data: RunData, kind: str, t0: int, t1: int) -> list[Sip]:
    """First transmissions of SMIG `kind` messages about the session, as they left the
    sending terminal (its own captures)."""
    found: list[Sip] = []
    for term in sorted(trial.terminals()):
        mine = trial.addrs(term)
        msgs = [m for m in data.sip(term, t0, t1) if m.src in mine and m.is_request
                and m.smig_type == kind and trial.session in m.sessions()]
        found += split_retransmissions(msgs)[0]
    return sorted(found, key=lambda m: m.t_ns)


def _message_rows(pm: dict[str, Any], trial: Trial, trig: int, rekey: bool = False
                  ) -> list[dict[str, Any]]:
    """The ladder's rows of `procedure_messages` output, in time order."""
    names = node_names(trial)
    again = {id(m) for m in pm["retransmitted"]}
    return [{"t_ms": _ms(m.t_ns - trig), "src": names.get(m.src, m.src),
             "dst": names.get(m.dst, m.dst), "src_ip": m.src, "dst_ip": m.dst,
             "label": m.label, "bytes": m.size, "retransmission": id(m) in again,
             **({"rekey": True} if rekey else {})}
            for m in sorted(pm["first"] + pm["retransmitted"], key=lambda m: m.t_ns)]


def analyze_trial(trial: Trial, data: RunData) -> dict[str, Any]:
    """Every measurement of one ok trial (see the module docstring)."""
    t0, trig, t1 = trial.t_start_ns, trial.t_trigger_ns, trial.t_end_ns
    checks: list[dict[str, Any]] = []
    notes: list[str] = []
    logs = data.logs
    terms = sorted(trial.terminals())
    res: dict[str, Any] = {"name": trial.name, **asdict(trial)}
    res["receivers"] = _receivers(trial, data, checks)
    gaps = [r["gap_ms"] for r in res["receivers"].values() if r["gap_ms"] is not None]
    res["gap_ms"] = max(gaps) if gaps else None
    res["lost"] = sum(r["lost"] for r in res["receivers"].values())
    # What the receiving applications missed (dropped after the wire, or never sent).
    res["app_lost"] = sum(r["events"]["lost"] for r in res["receivers"].values())

    # Handover: trigger -> first RTP from the new path at the peer.
    receivers, new_src, new_dst = _handover_path(trial)
    first_pcap = min((r for h in receivers for r in data.rtp(h, trig, t1)
                      if r.src in new_src and r.dst in (new_dst or trial.addrs(h))),
                     key=lambda r: r.t_ns, default=None)
    first_ev = min((r for h in receivers for r in data.rtp_rx(h, trig, t1)
                    if r.src in new_src), key=lambda r: r.t_ns, default=None)
    res["handover_ms"] = _ms(first_pcap.t_ns - trig) if first_pcap else None
    checks.append(agreement("first RTP on the new path", first_pcap and first_pcap.t_ns,
                            first_ev and first_ev.t_ns))

    # The procedure's own events: start, trigger (faults), switch-completes, done.
    if trial.family == "terminal":
        start = _first(logs.find([trial.mover], t0, t1, event="fig3", step=1,
                                 session=trial.session))
        completes = logs.find(terms, trig, t1, event="fig3", step=7, session=trial.session)
        dones = (logs.find(["sms"], trig, t1, event="fig3-switched", session=trial.session)
                 + logs.find([trial.mover], trig, t1, event="fig3", step="handover",
                             session=trial.session))
        first_msg_kind = "switch-request"
    else:
        start = _first([e for e in logs.find([trial.mover], t0, t1, event="fig4",
                                             step="trigger")
                        if trial.session in e.get("sessions", [trial.session])])
        completes = logs.find(terms, trig, t1, event="fig4", step="switch-complete",
                              session=trial.session)
        dones = logs.find([trial.mover], trig, t1, event="fig4", step="done")[:1]
        first_msg_kind = ""
    if start is None:
        notes.append("no procedure start event of the mover in the trial window")
    if trial.scenario in FAULT_SCENARIOS:
        trig_ev = _first(logs.find([trial.mover], trig, t1, event="trigger"))
        injected = _first(logs.find(["controller"], t0, t1, event="fault-injected"))
        res["injection_offset_ms"] = _ms(injected["t_ns"] - trig) if injected else None
        if injected is None:
            notes.append("no fault-injected event of the controller in the trial window")
        elif abs(injected["t_ns"] - trig) > AGREE_NS:
            notes.append(f"the controller injected the fault {res['injection_offset_ms']} ms "
                         "from the trial's t_trigger_ns (detection is timed from the latter)")
    else:
        trig_ev = start
    res["detection_ms"] = (_ms(trig_ev["t_ns"] - trig) if trig_ev else None) \
        if trial.scenario in FAULT_SCENARIOS else 0.0
    # What the method itself takes: the terminal's trigger -> first RTP on the new path
    # (detection is the same for every method: the media timeout, or the carrier event).
    if res["handover_ms"] is not None and res["detection_ms"] is not None:
        res["switch_ms"] = round(res["handover_ms"] - res["detection_ms"], 3)
    else:
        res["switch_ms"] = None
    if trig_ev is None:
        notes.append("no trigger event of the mover after the trigger")

    # Signalling: trigger event -> last switch-complete (on the wire where it is a message).
    last_ev = completes[-1]["t_ns"] if completes else None
    sc_msgs = _smig_sent(trial, data, "switch-complete", trig, t1)
    last_wire = sc_msgs[-1].t_ns if sc_msgs else None
    if trig_ev is not None and (last_wire or last_ev):
        res["signalling_ms"] = _ms((last_wire or last_ev) - trig_ev["t_ns"])  # type: ignore[operator]
        res["signalling_source"] = "pcap" if last_wire else "events"
    else:
        res["signalling_ms"], res["signalling_source"] = None, None
    if last_wire or last_ev:
        checks.append(agreement("last switch-complete sent", last_wire, last_ev))

    # Procedure start on the wire vs in the log (the first message the mover sends).
    mover_addrs = trial.addrs(trial.mover)
    if first_msg_kind:
        sent = _smig_sent(trial, data, first_msg_kind, t0, t1)
        sent = [m for m in sent if m.src in mover_addrs]
        start_ev = start
    else:
        sent = [m for m in data.sip(trial.mover, trig, t1)
                if m.src in mover_addrs and m.method == "REGISTER"]
        start_ev = _first(logs.find([trial.mover], trig, t1, event="fig4", step="register"))
    if sent or start_ev:
        checks.append(agreement("first message of the procedure sent",
                                sent[0].t_ns if sent else None,
                                start_ev["t_ns"] if start_ev else None))

    # Messages at the proxy: trigger -> completion, each hop, retransmissions apart.
    ends = [t for t in [last_ev, last_wire, *(e["t_ns"] for e in dones)] if t]
    t_done = max(ends) if ends else t1
    res["t_complete_ms"] = _ms(t_done - trig)
    foreign = {ip for k, ip in trial.addresses.items() if k.split("_")[0] not in terms}

    def related(m: Sip) -> bool:
        smig = m.smig or {}
        return (m.src not in foreign and m.dst not in foreign
                and smig.get("terminal", terms[0]) in terms)

    proxy = [m for n in data.captures if n.startswith("proxy-")
             for m in data._sip[n].between(trig, t1)]
    proxy.sort(key=lambda m: m.t_ns)
    if not proxy and not any(n.startswith("proxy-") for n in data.captures):
        notes.append("no proxy capture: messages not measured")
        res.update(messages=None, bytes=None, retransmissions=None, retransmitted_bytes=None)
        res["message_list"] = []
    else:
        if trial.family == "terminal":
            # Fig 3 goes on after its completion (the SMS's switch-done to every party, step
            # (9) after a key reuse): the session's messages to the trial's end, step (9) apart.
            def in_fig3(m: Sip) -> bool:
                return related(m) and not (trial.method == "reuse" and m.smig_type == "rekey")

            pm = procedure_messages(proxy, trig, t1, t1, in_fig3)
        else:
            pm = procedure_messages(proxy, trig, t_done, t1, related)
        if pm["first"]:  # the procedure ends with its last message (a response, an ACK)
            t_done = max(t_done, pm["first"][-1].t_ns)
            res["t_complete_ms"] = _ms(t_done - trig)
        res.update({k: pm[k] for k in ("messages", "bytes", "retransmissions",
                                       "retransmitted_bytes")})
        res["message_list"] = _message_rows(pm, trial, trig)
        if trial.method != "reinvite":
            at_proxy = {m.retrans_key()[:3] for m in pm["first"]
                        if m.smig_type == "switch-complete" and m.src in
                        {a for t in terms for a in trial.addrs(t)}}
            checks.append(_count_check("switch-complete messages", len(at_proxy),
                                       len(completes)))

    # Rekey (Fig 3 step 9 after a reuse switch): first step-9 event -> last "rekeyed".
    res["rekey_ms"] = res["rekey_messages"] = None
    rekeyed = logs.find(terms, trig, t1, event="fig3", step="rekeyed", session=trial.session)
    if rekeyed:
        first9 = _first(logs.find(None, trig, t1, event="fig3", step=9, session=trial.session))
        if first9:
            res["rekey_ms"] = _ms(rekeyed[-1]["t_ns"] - first9["t_ns"])
        rk = _smig_sent(trial, data, "rekey", trig, t1)
        checks.append(agreement("first rekey message sent", rk[0].t_ns if rk else None,
                                first9["t_ns"] if first9 else None))
        if proxy:  # step (9) comes after the switch: its messages apart from the procedure's
            done = {m.transaction() for m in pm["first"]}
            rpm = procedure_messages(proxy, trig, t1, t1, lambda m: related(m)
                                     and m.smig_type == "rekey" and m.transaction() not in done)
            res["rekey_messages"] = rpm["messages"]
            res["message_list"] = sorted(res["message_list"] + _message_rows(rpm, trial, trig,
                                                                             rekey=True),
                                         key=lambda row: row["t_ms"])
    res["checks"] = checks
    res["disagreements"] = [c for c in checks if c.get("agree") is False]
    res["notes"] = notes
    return res


# ---------------------------------------------------------------------------------------------
# Statistics, claims, files.

METRICS: list[tuple[str, str, str]] = [  # key, unit, column title
    ("handover_ms", "ms", "handover ms"), ("detection_ms", "ms", "detection ms"),
    ("switch_ms", "ms", "switch ms"),
    ("signalling_ms", "ms", "signalling ms"), ("messages", "msgs", "messages"),
    ("bytes", "B", "bytes"), ("retransmissions", "msgs", "retrans."),
    ("gap_ms", "ms", "max gap ms"), ("lost", "pkts", "lost"), ("app_lost", "pkts", "app lost"),
    ("rekey_ms", "ms", "rekey ms"), ("rekey_messages", "msgs", "rekey msgs"),
]


COUNT_UNITS = ("msgs", "B", "pkts")
# The table's order: scenarios as the experiment lists them (a delay sweep's after its base),
# methods proposal first; whatever the order the trials ran in (it is shuffled).
def _table_order(scenario: str, method: str) -> tuple[int, int, int, str]:
    """Scenarios in run order; a delay sweep's rows (link-planned-rttN) after the scenario's
    own, by RTT (rtt0 is a sweep row too: it ran with the sweep, not with the scenario)."""
    base, _, rtt = scenario.partition("-rtt")
    s = SCENARIO_ORDER.index(base) if base in SCENARIO_ORDER else len(SCENARIO_ORDER)
    sweep = int(rtt) if rtt.isdigit() else -1
    m = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return s, sweep, m, scenario + method


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Statistics per scenario x method over the ok trials (failed ones are only counted)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["scenario"], r["method"]), []).append(r)
    out = []
    for (scenario, method), rows in sorted(groups.items(), key=lambda kv: _table_order(*kv[0])):
        ok = [r for r in rows if r.get("ok")]
        agg: dict[str, Any] = {"scenario": scenario, "method": method,
                               "family": rows[0].get("family", ""), "trials": len(ok),
                               "failed": len(rows) - len(ok)}
        for key, _, _ in METRICS:
            agg[key] = summarize(r.get(key) for r in ok)
        out.append(agg)
    return out


def _cell(stat: dict[str, Any], count: bool = False) -> str:
    if not stat or stat["median"] is None:
        return "–"
    med, p95 = stat["median"], stat["p95"]
    if count:  # whole things: a median may fall between two, a percentile is a whole one
        return f"{med:.1f} ({p95:.0f})" if not float(med).is_integer() else f"{med:.0f} ({p95:.0f})"
    whole = float(med).is_integer() and float(p95).is_integer()
    digits = 0 if whole or max(abs(med), abs(p95)) >= 100 else 1
    return f"{med:.{digits}f} ({p95:.{digits}f})"


def markdown(summary: dict[str, Any]) -> str:
    """results.md: the table (median (p95) per scenario x method), claims, failures."""
    cols = [title for _, _, title in METRICS]
    lines = [f"# Results: {summary['run']}", "",
             "Median (p95) over the ok trials; min and max are in results.csv. *handover*: "
             "trigger (fault injection or command) to the first RTP on the new path at the "
             "peer; *detection*: trigger to the terminal's trigger event; *switch*: that event "
             "to the first RTP on the new path (handover minus detection: what the method "
             "takes); *signalling*: that event to the last switch-complete. *max gap*, *lost*: "
             "at the receivers, on the wire (captures); *app lost*: what the receiving "
             "applications missed. Messages and bytes: SIP at the proxy, each hop, first "
             "transmissions, up to the procedure's last message (its last response or ACK; "
             "a terminal switch's include the switch-done notices and the old dialog's BYE); "
             "*rekey*: step (9), after a key-reuse switch, with its own messages (*rekey "
             "msgs*; the renegotiate baseline's rekey comes first and is in *messages*).",
             "", "| scenario | method | trials | " + " | ".join(cols) + " |",
             "|" + "---|" * (3 + len(cols))]
    for a in summary["aggregates"]:
        trials = f"{a['trials']}" + (f" (+{a['failed']} failed)" if a["failed"] else "")
        lines.append(f"| {a['scenario']} | {a['method']} | {trials} | "
                     + " | ".join(_cell(a[k], unit in COUNT_UNITS) for k, unit, _ in METRICS)
                     + " |")
    lines += ["", *claims_markdown(summary["claims"])]
    failed = summary["failed"]
    if failed:
        lines += ["", "## Failed trials (excluded)", ""]
        lines += [f"* {f['name']}: {f['error']}" for f in failed]
    lines += ["", *_agreement_section(summary)]
    if summary["problems"]:
        lines += ["", "## Problems", ""] + [f"* {p}" for p in summary["problems"]]
    return "\n".join(lines) + "\n"


def _agreement_section(summary: dict[str, Any]) -> list[str]:
    """How the captures (the table's source) and the nodes' event logs agree, per check."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in summary["trials"]:
        for c in t.get("checks", []):
            if c.get("agree") is not None:
                groups.setdefault(re.sub(r" at \S+$", "", c["metric"]), []).append(c)
    total = sum(len(cs) for cs in groups.values())
    agree = sum(1 for cs in groups.values() for c in cs if c["agree"])
    lines = ["## Capture vs event log", "",
             f"The table comes from the captures; each figure is also taken from the nodes' "
             f"event logs. {agree} of {total} checks agree within {AGREE_NS / 1e6:g} ms."]
    if (summary.get("capabilities") or {}).get("ipsec_backend") == "userspace":
        lines.append("With the userspace ESP engine a packet spends its decryption (or "
                     "encryption) time between the wire and the socket: the logs see it "
                     "that much later (or earlier).")
    lines.append("Loss counts differ when a packet on the wire never reached the receiving "
                 "application (its host dropped it, e.g. before its inbound SA was in place): "
                 "*app lost* in the table counts those.")
    lines += ["", "| check | disagree | of | median offset | largest offset | pcap is |",
              "|---|---|---|---|---|---|"]
    for name, cs in groups.items():
        off = [c for c in cs if c["agree"] is False]
        diffs = [abs(c["diff_ms"]) for c in off if c.get("diff_ms") is not None]
        later = sum(1 for c in off if (c.get("diff_ms") or 0) > 0)
        more, less = ("longer", "shorter") if cs[0].get("duration") else ("later", "earlier")
        side = (f"{more} {later}, {less} {len(diffs) - later}" if diffs else
                "counts differ" if off else "–")
        med = f"{percentile(diffs, 50):.2f} ms" if diffs else "–"
        big = f"{max(diffs):.2f} ms" if diffs else "–"
        lines.append(f"| {name} | {len(off)} | {len(cs)} | {med} | {big} | {side} |")
    lines.append("")
    lines.append("Each disagreement, trial by trial: `trials[].disagreements` in results.json.")
    return lines


def _write_csvs(run_dir: Path, summary: dict[str, Any]) -> None:
    with open(run_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "method", "family", "metric", "unit", "trials", "n", "median",
                    "p95", "min", "max"])
        for a in summary["aggregates"]:
            for key, unit, _ in METRICS:
                s = a[key]
                w.writerow([a["scenario"], a["method"], a["family"], key, unit, a["trials"],
                            s["n"], s["median"], s["p95"], s["min"], s["max"]])
    cols = ["scenario", "method", "trial", "session", "ok", "error"] + [k for k, _, _ in METRICS] \
        + ["disagreements"]
    with open(run_dir / "results-trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for t in summary["trials"] + summary["failed"]:
            w.writerow([len(t.get("disagreements", [])) if c == "disagreements" else t.get(c)
                        for c in cols])


def incomplete_captures(run: Path) -> list[str]:
    """The pcaps the lab found short at its teardown (its manifest): their figures undercount."""
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return []
    short = manifest.get("incomplete_captures") if isinstance(manifest, dict) else None
    return [f"capture {intf} is incomplete: {what}"
            for intf, what in (short.items() if isinstance(short, dict) else [])]


def load_capabilities(run: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """capabilities.json (None if absent), and what is wrong with it."""
    path = run / "capabilities.json"
    if not path.exists():
        return None, []
    try:
        value = json.loads(path.read_bytes().decode())
    except (OSError, ValueError) as exc:
        return None, [f"capabilities.json cannot be read ({exc}): the lab's capabilities "
                      "(ESP backend, netem) are unknown"]
    if not isinstance(value, dict):
        return None, [f"capabilities.json is a JSON {type(value).__name__}, not an object: "
                      "the lab's capabilities (ESP backend, netem) are unknown"]
    return value, []


def analyze(run_dir: str | Path, workers: int = 2, write: bool = True) -> dict[str, Any]:
    """Analyse every trial of a run folder; write results.json, results.csv,
    results-trials.csv and results.md into it (unless `write` is False); return the summary:
    {"run", "capabilities", "trials" (ok, analysed), "failed", "aggregates", "claims",
    "problems"}."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"not a run folder: {run}")
    trials, problems = load_trials(run)
    problems += incomplete_captures(run)
    capabilities, caps_problem = load_capabilities(run)
    problems += caps_problem
    ok = [t for t in trials if t.ok]
    hosts = {h for t in ok for h in t.terminals()}
    esp = bool(capabilities and capabilities.get("ipsec_backend")) or (run / "esp_sa").exists()
    data = load_run(run, hosts, workers, esp_in_use=esp)
    problems += data.problems + missing_logs(run, ok, data.logs)
    analysed, failed = [], []
    for t in trials:
        if not t.ok:
            failed.append({"name": t.name, **asdict(t)})
            continue
        try:
            analysed.append(analyze_trial(t, data))
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{t.name}: not analysed: {exc}")
            failed.append({"name": t.name, **asdict(t), "ok": False,
                           "error": f"analysis: {exc}"})
    problems += data.logs.problems  # last: the trials' analysis may have added some
    summary = {"run": run.name, "capabilities": capabilities, "trials": analysed, "failed": failed,
               "aggregates": aggregate(analysed + failed), "problems": problems}
    summary["claims"] = claims(analysed + failed)
    if write:
        (run / "results.json").write_text(json.dumps(summary, indent=1, default=str))
        _write_csvs(run, summary)
        (run / "results.md").write_text(markdown(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.analysis", description=__doc__.split(
        "\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--workers", type=int, default=2, help="tshark processes in parallel")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = ap.parse_args(argv)
    try:
        summary = analyze(args.run_dir, args.workers)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.no_plots:
        try:
            from experiments.ladder import draw_ladders
            from experiments.plots import draw_plots
            pngs = draw_plots(args.run_dir, summary) + draw_ladders(args.run_dir, summary)
            print(f"{len(pngs)} plots in {args.run_dir / 'plots'}", file=sys.stderr)
        except ImportError as exc:
            print(f"plots skipped: {exc}", file=sys.stderr)
    print(markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
