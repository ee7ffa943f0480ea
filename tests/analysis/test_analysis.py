"""Pure tests of the analysis: statistics, gaps, loss (wraparound, a hole), retransmissions,
procedure message counting, tshark row parsing, trials, cross-checks and claims verdicts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from experiments.analysis import (
    Rtp,
    Sip,
    Trial,
    aggregate,
    agreement,
    claims,
    epoch_ns,
    longest_gap,
    markdown,
    parse_tshark_row,
    percentile,
    procedure_messages,
    rtp_loss,
    split_retransmissions,
    summarize,
    tshark_unescape,
)


def sip(t: int, src: str, dst: str, method: str | None = None, status: int | None = None,
        cseq: int = 1, cmeth: str = "MESSAGE", cid: str = "c1", body: str = "") -> Sip:
    text = f"Call-ID: {cid}\r\nCSeq: {cseq} {cmeth}\r\n\r\n{body}"
    return Sip(t, src, 5060, dst, 5060, 400, method, status, cseq, cmeth, cid, text)


# -- statistics ---------------------------------------------------------------------------------

def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert percentile([7], 95) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_skips_missing_values() -> None:
    assert summarize([3, None, 1, 2]) == {"n": 3, "median": 2.0, "p95": 2.9, "min": 1.0,
                                          "max": 3.0}
    assert summarize([None]) == {"n": 0, "median": None, "p95": None, "min": None,
                                 "max": None}


# -- media gap and loss -------------------------------------------------------------------------

def test_longest_gap_is_between_consecutive_arrivals() -> None:
    assert longest_gap([0, 20, 40, 140, 160]) == (100, 140)
    assert longest_gap([160, 0, 140, 20]) == (120, 140)  # order of input does not matter
    assert longest_gap([5]) is None
    assert longest_gap([]) is None


def test_loss_across_sequence_wraparound() -> None:
    assert rtp_loss([(1, 65534), (1, 65535), (1, 0), (1, 1)])["lost"] == 0
    res = rtp_loss([(1, 65534), (1, 65535), (1, 1), (1, 2)])
    assert res["lost"] == 1 and res["expected"] == 5 and res["received"] == 4


def test_loss_reordering_duplicates_and_ssrcs() -> None:
    res = rtp_loss([(1, 10), (1, 12), (1, 11), (1, 11), (2, 500), (2, 503)])
    assert res["lost"] == 2  # 501 and 502 of SSRC 2; the reordered 11 is not lost
    assert res["duplicates"] == 1 and res["ssrcs"] == 2
    assert rtp_loss([])["lost"] == 0


# -- SIP: retransmissions and the procedure's messages -------------------------------------------

def test_retransmission_is_the_same_message_on_the_same_hop_again() -> None:
    a = sip(1, "10.0.1.10", "10.0.0.10", "MESSAGE")
    again = sip(2, "10.0.1.10", "10.0.0.10", "MESSAGE")
    forwarded = sip(3, "10.0.0.10", "10.0.0.11", "MESSAGE")  # next hop: not a retransmission
    trying = sip(4, "10.0.0.11", "10.0.0.10", status=100)
    ok = sip(5, "10.0.0.11", "10.0.0.10", status=200)
    ok2 = sip(6, "10.0.0.11", "10.0.0.10", status=200)
    first, retrans = split_retransmissions([a, again, forwarded, trying, ok, ok2])
    assert first == [a, forwarded, trying, ok] and retrans == [again, ok2]


def test_procedure_messages_follow_transactions_started_in_the_window() -> None:
    before = sip(5, "10.0.3.10", "10.0.0.10", "MESSAGE", cid="old")
    before_ok = sip(15, "10.0.0.10", "10.0.3.10", status=200, cid="old")
    req = sip(10, "10.0.1.10", "10.0.0.10", "REGISTER", cmeth="REGISTER", cid="r")
    req_again = sip(12, "10.0.1.10", "10.0.0.10", "REGISTER", cmeth="REGISTER", cid="r")
    late_ok = sip(40, "10.0.0.10", "10.0.1.10", status=200, cmeth="REGISTER", cid="r")
    late_req = sip(35, "10.0.1.10", "10.0.0.10", "MESSAGE", cid="later")
    foreign = sip(20, "10.0.1.20", "10.0.0.10", "MESSAGE", cid="a2")
    msgs = [before, req, req_again, before_ok, foreign, late_req, late_ok]
    res = procedure_messages(msgs, 10, 30, 100, related=lambda m: m.src != "10.0.1.20")
    assert res["first"] == [req, late_ok]
    assert res["retransmitted"] == [req_again]
    assert (res["messages"], res["retransmissions"], res["bytes"]) == (2, 1, 800)


def test_the_ack_of_an_invite_in_the_procedure_counts_after_the_window() -> None:
    """A re-INVITE's procedure may be logged done at its 200; the ACK, a transaction of its
    own, comes after and still belongs to it (a race had dropped it from some trials)."""
    inv = sip(10, "10.0.1.10", "10.0.0.10", "INVITE", cseq=2, cmeth="INVITE", cid="d")
    ok = sip(20, "10.0.0.10", "10.0.1.10", status=200, cseq=2, cmeth="INVITE", cid="d")
    ack = sip(25, "10.0.1.10", "10.0.0.10", "ACK", cseq=2, cmeth="ACK", cid="d")
    other_ack = sip(26, "10.0.1.10", "10.0.0.10", "ACK", cseq=1, cmeth="ACK", cid="d")
    too_late = sip(120, "10.0.1.10", "10.0.0.10", "ACK", cseq=2, cmeth="ACK", cid="d")
    res = procedure_messages([inv, ok, ack, other_ack, too_late], 10, 20, 100)
    assert res["first"] == [inv, ok, ack]


def test_smig_body_type_and_sessions() -> None:
    m = sip(1, "a", "b", "MESSAGE", body=json.dumps({"type": "switch-complete", "session": "s"}))
    assert m.smig_type == "switch-complete" and m.sessions() == {"s"}
    assert m.label == "MESSAGE switch-complete"
    reg = sip(1, "a", "b", "REGISTER", cmeth="REGISTER",
              body='{"type": "link-switch", "sessions": ["x", "y"]}')
    assert reg.sessions() == {"x", "y"}
    assert sip(1, "a", "b", status=200, body="v=0\r\n").smig is None
    assert sip(1, "a", "b", status=200).label == "200 MESSAGE"


# -- tshark rows ----------------------------------------------------------------------------------

def test_tshark_rows_parse_exactly() -> None:
    assert epoch_ns("1796326247.758941000") == 1796326247758941000
    assert epoch_ns("12.5") == 12_500_000_000
    rtp = parse_tshark_row(["1.000000001", "10.0.3.10", "10.0.1.10", "39716", "57722", "200",
                            "0x1df5de47", "50002", "", "", "", "", "", ""])
    assert rtp == Rtp(1_000_000_001, "10.0.3.10", 39716, "10.0.1.10", 57722, 0x1DF5DE47, 50002)
    hdr = r'Call-ID: x\r\nCSeq: 1 MESSAGE\r\n\r\n{"type":"rekey","session":"s"}'
    msg = parse_tshark_row(["2.0", "10.0.1.20", "10.0.0.10", "5064", "5066", "572", "", "",
                            "MESSAGE", "", "1", "MESSAGE", "x", hdr])
    assert isinstance(msg, Sip) and msg.smig_type == "rekey" and msg.cseq == 1
    assert parse_tshark_row(["", "", ""]) is None
    secret = (r'Call-ID: x\r\nAuthorization: Digest nonce="lg9p3UEl6BvEySKIMJQZXg==", '
              r'response="' + "3d" * 32 + r'"\r\n\r\na=m2m-key:zLPF0AjSDbmF6io92VgslA==;spi=7'
              r'\r\n{"keys":{"enc":"' + "82" * 16 + '"}}')
    msg = parse_tshark_row(["2.0", "10.0.1.20", "10.0.0.10", "5064", "5066", "572", "", "",
                            "MESSAGE", "", "1", "MESSAGE", "x", secret])
    assert isinstance(msg, Sip)
    assert msg.text == ('Call-ID: x\r\nAuthorization: Digest nonce="<redacted>", response='
                        '"<redacted>"\r\n\r\na=m2m-key:<redacted>;spi=7\r\n'
                        '{"keys":{"enc":"<redacted>"}}')
    assert tshark_unescape(r"a\r\nb\tc\\d\101") == "a\r\nb\tc\\dA"


# -- trials and cross-checks ----------------------------------------------------------------------

TRIAL: dict[str, Any] = {
    "scenario": "link-planned", "family": "link", "method": "proposed", "trial": 1,
    "session": "c@x", "t_start_ns": 1, "t_trigger_ns": 2, "t_end_ns": 3, "mover": "a1",
    "peer": "b1", "old": {"a": "a1", "b": "b1"}, "new": {"a": "a1", "b": "b1"},
    "addresses": {"a1": "10.0.1.10", "a1_new": "10.0.2.10", "b1": "10.0.3.10"}, "ok": True,
    "error": None,
}


def test_trial_from_json_checks_its_fields() -> None:
    t = Trial.from_json(TRIAL)
    assert t.addrs("a1") == {"10.0.1.10", "10.0.2.10"} and t.sides() == {"a": ["a1"],
                                                                          "b": ["b1"]}
    terminal = Trial.from_json({**TRIAL, "new": {"a": "a2", "b": "b2"}})
    assert terminal.sides() == {"a": ["a1", "a2"], "b": ["b1", "b2"]}
    failed = Trial.from_json({"scenario": "x", "method": "y", "trial": 2, "ok": False,
                              "error": "boom"})
    assert failed.error == "boom"
    with pytest.raises(ValueError, match="t_trigger_ns"):
        Trial.from_json({**TRIAL, "t_trigger_ns": "soon"})
    with pytest.raises(ValueError, match="'ok'"):
        Trial.from_json({k: v for k, v in TRIAL.items() if k != "ok"})
    with pytest.raises(ValueError, match="not a JSON object"):
        Trial.from_json([1])


def test_agreement_says_who_is_off_and_by_how_much() -> None:
    assert agreement("x", 10_000_000, 10_400_000)["agree"] is True
    late = agreement("x", 12_500_000, 10_000_000)
    assert late["agree"] is False and late["diff_ms"] == 2.5
    assert "pcap is 2.500 ms later" in late["note"]
    assert agreement("x", None, 5)["agree"] is None
    gap = agreement("media gap at a1", 20_000_000, 30_000_000, duration=True)
    assert gap["note"] == "pcap is 10.000 ms shorter than the events"


def test_agreement_section_groups_checks_and_table_counts_are_whole() -> None:
    checks = [agreement("media gap at a1", 20_000_000, 30_000_000, duration=True),
              agreement("media gap at b1", 20_000_000, 20_500_000, duration=True),
              agreement("first RTP on the new path", 5_000_000, 2_000_000)]
    summary = {"run": "r", "aggregates": aggregate([
        {"scenario": "link-planned", "method": "proposed", "family": "link", "ok": True,
         "messages": m, "handover_ms": 30.0} for m in (52, 52, 53, 55)]),
        "claims": claims([]), "failed": [], "problems": [],
        "trials": [{"name": "t", "checks": checks}],
        "capabilities": {"ipsec_backend": "userspace"}}
    text = markdown(summary)
    assert "1 of 3 checks agree within 1 ms." in text
    assert "| media gap | 1 | 2 | 10.00 ms | 10.00 ms | longer 0, shorter 1 |" in text
    assert "| first RTP on the new path | 1 | 1 | 3.00 ms | 3.00 ms | later 1, earlier 0 |" in text
    assert "userspace ESP engine" in text
    assert "| 52.5 (55) |" in text  # messages: median between two, p95 a whole count


# -- statistics and results.md ---------------------------------------------------------------

def test_failed_trials_are_counted_apart_and_listed() -> None:
    rows = [{"scenario": "link-planned", "method": "proposed", "family": "link", "ok": False,
             "handover_ms": 300, "messages": 34, "lost": 0},
            {"scenario": "terminal-switch", "method": "reuse", "family": "terminal", "ok": True,
             "handover_ms": 90, "messages": 48, "lost": 0}]
    aggs = aggregate(rows)
    planned = next(a for a in aggs if a["scenario"] == "link-planned")
    assert planned["trials"] == 0 and planned["failed"] == 1
    assert planned["handover_ms"]["n"] == 0
    text = markdown({"run": "r", "aggregates": aggs, "claims": claims(rows), "trials": [],
                     "failed": [{"name": "link-planned/proposed#1", "error": "boom"}],
                     "problems": []})
    assert "| link-planned | proposed | 0 (+1 failed) |" in text and "boom" in text
    assert "None" not in text


def test_table_rows_in_the_experiments_order_whatever_order_trials_ran_in() -> None:
    rows = [{"scenario": s, "method": m, "family": "x", "ok": True}
            for s, m in [("terminal-switch", "renegotiate"), ("link-planned-rtt20", "proposed"),
                         ("link-blackhole", "reinvite"), ("link-planned", "reinvite"),
                         ("link-planned", "proposed"), ("terminal-switch", "reuse"),
                         ("link-planned-rtt100", "proposed"),
                         ("link-planned-rtt0", "register-then-switch"),
                         ("link-planned-rtt0", "proposed")]]
    # (the sweep's rtt0 rows once sorted among link-planned's own: "" and "0" padded alike)
    assert [(a["scenario"], a["method"]) for a in aggregate(rows)] == [
        ("link-planned", "proposed"), ("link-planned", "reinvite"),
        ("link-planned-rtt0", "proposed"), ("link-planned-rtt0", "register-then-switch"),
        ("link-planned-rtt20", "proposed"), ("link-planned-rtt100", "proposed"),
        ("link-blackhole", "reinvite"), ("terminal-switch", "reuse"),
        ("terminal-switch", "renegotiate")]
