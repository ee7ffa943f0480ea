"""experiments.plots and experiments.ladder on hand-made results (no lab, no root, no tshark):
which trial is drawn, the timeline lanes per direction and path, the markers, the colours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_hex

from experiments.analysis import Capture, Rtp, RunData, RunLogs, Trial
from experiments.ladder import draw_ladders, ladder_rows
from experiments.plots import (
    METHOD_COLOURS,
    OLD_PATH_COLOUR,
    Lane,
    Marker,
    _cdf_panel,
    caption,
    gap_curves,
    markers,
    median_trial,
    median_trials,
    method_colour,
    rtp_lanes,
    timeline,
    x_limits,
)

T0 = 1_800_000_000_000_000_000
MS = 1_000_000
A1, A1_NEW, B1, A2, B2 = "10.0.1.10", "10.0.2.10", "10.0.3.10", "10.0.1.20", "10.0.3.20"
LINK = {"scenario": "link-planned", "family": "link", "method": "proposed", "trial": 1,
        "ok": True, "session": "s1", "t_start_ns": T0 - 1000 * MS, "t_trigger_ns": T0,
        "t_end_ns": T0 + 1000 * MS, "mover": "a1", "peer": "b1",
        "old": {"a": "a1", "b": "b1"}, "new": {"a": "a1", "b": "b1"},
        "addresses": {"a1": A1, "a1_new": A1_NEW, "b1": B1}}
TERMINAL = {**LINK, "scenario": "terminal-switch", "family": "terminal", "method": "reuse",
            "new": {"a": "a2", "b": "b2"}, "addresses": {"a1": A1, "a2": A2, "b1": B1, "b2": B2}}


def result(trial: int, handover: float | None, **extra: Any) -> dict[str, Any]:
    return {**LINK, "trial": trial, "handover_ms": handover, **extra}


def rtp(t_ms: float, src: str, dst: str) -> Rtp:
    return Rtp(T0 + int(t_ms * MS), src, 4000, dst, 5000, 1, 0)


# ---------------------------------------------------------------------------------------------
# The trial drawn.


def test_the_median_trial_by_handover_is_drawn_not_the_first() -> None:
    rows = [result(1, 300.0), result(2, 100.0), result(3, 200.0), result(4, 500.0),
            result(5, 150.0)]
    pick = median_trial(rows)
    assert pick.result["trial"] == 3 and pick.n == 5 and pick.median
    assert caption(pick) == "link-planned / proposed — trial 3, the median handover of 5 trials"


def test_median_of_an_even_count_is_the_lower_one_and_unmeasured_trials_are_skipped() -> None:
    rows = [result(1, None), result(2, 40.0), result(3, 10.0), result(4, 30.0), result(5, 20.0)]
    pick = median_trial(rows)
    assert (pick.result["trial"], pick.n) == (5, 4)
    assert "trial 5, the lower median handover of 4 trials" in caption(pick)


def test_ties_go_to_the_lower_trial_number_and_no_handover_falls_back_to_the_first() -> None:
    assert median_trial([result(3, 50.0), result(1, 50.0), result(2, 50.0)]).result["trial"] == 2
    pick = median_trial([result(1, None), result(2, None)])
    assert pick.result["trial"] == 1 and not pick.median
    assert "no trial has a handover time" in caption(pick)


def test_one_median_trial_per_scenario_and_method_in_run_order() -> None:
    trials = [result(1, 9.0), {**result(1, 5.0), "method": "reinvite"}, result(2, 1.0),
              result(3, 5.0), {**result(2, 7.0), "method": "reinvite"}]
    picks = median_trials({"trials": trials})
    assert [(p.result["method"], p.result["trial"]) for p in picks] == [
        ("proposed", 3), ("reinvite", 1)]


# ---------------------------------------------------------------------------------------------
# Timeline lanes and markers.


def test_link_switch_lanes_separate_each_direction_and_path() -> None:
    packets = [rtp(-20, A1, B1), rtp(40, A1_NEW, B1), rtp(-10, B1, A1), rtp(60, B1, A1_NEW),
               rtp(70, B1, A1_NEW), rtp(5, "10.0.0.10", A1)]  # the proxy's: not a call path
    lanes = rtp_lanes(Trial.from_json(LINK), packets)
    assert sorted(lanes) == [Lane(("a", "b"), False, A1, B1), Lane(("a", "b"), True, A1_NEW, B1),
                             Lane(("b", "a"), False, B1, A1), Lane(("b", "a"), True, B1, A1_NEW)]
    assert lanes[Lane(("b", "a"), True, B1, A1_NEW)] == [60.0, 70.0]  # ms from the trigger


def test_terminal_switch_lanes_mark_the_new_terminals_as_the_new_path() -> None:
    packets = [rtp(-20, A1, B1), rtp(30, A2, B2), rtp(-20, B1, A1), rtp(35, B2, A2),
               rtp(1, A1, A2)]  # one side to itself: not a direction of the call
    lanes = rtp_lanes(Trial.from_json(TERMINAL), packets)
    assert {(lane.direction, lane.new, lane.src, lane.dst) for lane in lanes} == {
        (("a", "b"), False, A1, B1), (("a", "b"), True, A2, B2),
        (("b", "a"), False, B1, A1), (("b", "a"), True, B2, A2)}


def test_markers_of_a_fault_trial_include_the_detection_in_time_order() -> None:
    res = {**result(1, 430.0), "scenario": "link-blackhole", "detection_ms": 300.0,
           "t_complete_ms": 500.0}
    assert [(m.kind, m.t_ms) for m in markers(res)] == [
        ("trigger", 0.0), ("detected", 300.0), ("new-path", 430.0), ("complete", 500.0)]
    assert markers(res)[0].label == "trigger: fault injected"
    planned = markers({**result(1, None), "detection_ms": 0.0, "t_complete_ms": 90.0})
    assert [m.kind for m in planned] == ["trigger", "complete"]
    assert planned[0].label == "trigger: command"


def test_ladder_rows_put_the_markers_between_the_messages() -> None:
    msgs = [{"t_ms": 0.0, "label": "REGISTER"}, {"t_ms": 50.0, "label": "200 REGISTER"},
            {"t_ms": 90.0, "label": "MESSAGE switch-complete"}, {"t_ms": 95.0, "label": "200"}]
    res = {**result(1, 60.0), "t_complete_ms": 90.0, "message_list": msgs}
    rows = ladder_rows(res)
    kinds = [r.kind if isinstance(r, Marker) else r["label"] for r in rows]
    assert kinds == ["trigger", "REGISTER", "200 REGISTER", "new-path",
                     "MESSAGE switch-complete", "complete", "200"]


def fake_run(tmp_path: Path) -> RunData:
    a1 = [rtp(t, B1, A1 if t < 50 else A1_NEW) for t in range(-400, 400, 20)]
    b1 = [rtp(t, A1 if t < 40 else A1_NEW, B1) for t in range(-400, 400, 20)]
    caps = {"a1-wlan": Capture("a1-wlan", [r for r in a1 if r.dst == A1]),
            "a1-lte": Capture("a1-lte", [r for r in a1 if r.dst == A1_NEW]),
            "b1-netb": Capture("b1-netb", b1)}
    return RunData(tmp_path, caps, RunLogs({}, {}))


def test_timeline_draws_old_paths_grey_and_new_paths_in_the_method_colour(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[Any] = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to look at
    res = {**result(1, 60.0), "t_complete_ms": 80.0, "gap_ms": 20.0, "lost": 0}
    out = timeline(median_trial([res]), fake_run(tmp_path), tmp_path / "t.png")
    assert out.read_bytes().startswith(b"\x89PNG")
    ax = drawn[0].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["a1 10.0.1.10 (wlan) → b1 10.0.3.10 (netb)",
                      "a1 10.0.2.10 (lte) → b1 10.0.3.10 (netb)",
                      "b1 10.0.3.10 (netb) → a1 10.0.1.10 (wlan)",
                      "b1 10.0.3.10 (netb) → a1 10.0.2.10 (lte)"]
    ticks = [line for line in ax.lines if line.get_marker() == "|"]
    assert [to_hex(line.get_color()) for line in ticks] == [
        to_hex(OLD_PATH_COLOUR), METHOD_COLOURS["proposed"]] * 2
    zoom = drawn[0].axes[1]  # the same lanes, zoomed in on the marks
    assert [t.get_text() for t in zoom.get_yticklabels()] == labels
    assert zoom.get_xlim() == (-60.0, 140.0)
    legend = [t.get_text() for t in zoom.get_legend().get_texts()]
    assert "first RTP on the new path (handover) (+60 ms)" in legend
    assert "trigger: command (+0 ms)" in legend
    assert "procedure's last message (+80 ms)" in legend
    assert "trial 1" in ax.get_title()


def test_draw_ladders_draws_the_median_trial(tmp_path: Path) -> None:
    msgs = [{"t_ms": 5.0, "src": "a1", "dst": "proxy", "src_ip": A1_NEW, "dst_ip": "10.0.0.10",
             "label": "REGISTER", "retransmission": False}]
    trials = [{**result(n, h), "t_complete_ms": 90.0, "messages": 1, "message_list": msgs}
              for n, h in ((1, 10.0), (2, 30.0), (3, 20.0))]
    (png,) = draw_ladders(tmp_path, {"trials": trials})
    assert png.name == "ladder-link-planned-proposed.png" and png.stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Colours and the gap CDF.


def test_every_method_of_the_experiment_has_a_colour_of_its_own() -> None:
    from experiments.experiment import METHODS
    methods = [m for ms in METHODS.values() for m in ms]
    assert all(m in METHOD_COLOURS for m in methods)
    assert len({method_colour(m) for m in methods}) == len(methods)
    assert to_hex(OLD_PATH_COLOUR) not in {to_hex(c) for c in METHOD_COLOURS.values()}


def gap_trial(scenario: str, method: str, *gaps: float) -> dict[str, Any]:
    return {"family": "link", "scenario": scenario, "method": method,
            "receivers": {f"r{i}": {"gap_ms": g} for i, g in enumerate(gaps)}}


def test_gap_curves_are_a_panel_per_scenario_and_a_curve_per_method_in_fixed_order() -> None:
    trials = [gap_trial("link-blackhole", "reinvite", 450.0, 430.0),
              gap_trial("link-planned", "reinvite", 50.0),
              gap_trial("link-planned", "proposed", 40.0, 45.0),
              gap_trial("link-blackhole", "proposed", 420.0),
              gap_trial("link-planned", "proposed", 30.0),
              {**gap_trial("terminal-switch", "reuse", 60.0), "family": "terminal"}]
    panels = gap_curves({"trials": trials}, "link")
    assert list(panels) == ["link-planned", "link-blackhole"]
    assert list(panels["link-planned"]) == ["proposed", "reinvite"]
    assert panels["link-planned"]["proposed"] == [30.0, 40.0, 45.0]
    assert panels["link-blackhole"]["reinvite"] == [430.0, 450.0]


def test_a_cdf_panel_draws_each_method_in_its_colour_within_the_data_range() -> None:
    fig, ax = plt.subplots()
    _cdf_panel(ax, "link-planned", {"proposed": [40.0, 50.0], "reinvite": [45.0, 60.0]})
    colours = {to_hex(line.get_color()) for line in ax.lines}
    assert colours == {METHOD_COLOURS["proposed"], METHOD_COLOURS["reinvite"]}
    lo, hi = ax.get_xlim()
    assert 30.0 < lo < 40.0 and 60.0 < hi < 70.0  # not stretched to 0 or to other panels
    plt.close(fig)


def test_x_limits_pad_the_data_and_stay_at_or_above_zero() -> None:
    assert x_limits([100.0, 200.0]) == (92.0, 208.0)
    assert x_limits([1.0, 2.0]) == (0.0, 5.0)
