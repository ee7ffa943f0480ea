"""Plots of an analysed run (matplotlib, Agg backend, PNGs under <run>/plots/):

* ``timeline-<scenario>-<method>.png`` — RTP arrivals per path around the switch, for the
  median trial by handover time of each scenario x method (named in the title): x = ms from
  the trigger, one lane per direction and path (sender address -> receiver address; grouped by
  direction, the old path grey above the new path in the method's colour, a triangle at each
  direction's first packet on its new path), a tick per packet (from the decrypted captures),
  vertical lines — named with their times in the legend — at the trigger, the mover's
  detection (fault scenarios), the first RTP on the new path at the peer (the handover) and
  the completion of the procedure; below, the same zoomed in on the marks;
* ``gap-cdf-<family>.png`` — CDF of the media gap (per receiver, ok trials): one panel per
  scenario of the family (each with its own x range), a curve per method.

Every figure gives a method the same colour (``METHOD_COLOURS``), and the ladders
(experiments.ladder) use the same trial choice (``median_trials``) and markers (``markers``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend is chosen first
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from experiments.analysis import (
    FAULT_SCENARIOS,
    Rtp,
    RunData,
    Trial,
    load_run,
    node_names,
    percentile,
)
from experiments.claims import LINK_SCENARIOS

MARGIN_MS = 600.0  # shown before the trigger and after the completion
ZOOM_MARGIN_MS = 60.0  # the zoomed panel: three voice packets either side of the marks

# One colour per method in every figure (Okabe-Ito, colour-blind safe); the old path is grey.
METHOD_COLOURS: dict[str, str] = {
    "proposed": "#0072b2",              # blue
    "register-then-switch": "#e69f00",  # orange
    "reinvite": "#009e73",              # green
    "reuse": "#cc79a7",                 # reddish purple
    "renegotiate": "#d55e00",           # vermillion
}
OTHER_METHOD_COLOUR = "#56b4e9"  # sky blue: a method not listed above
OLD_PATH_COLOUR = "0.55"
METHOD_ORDER = tuple(METHOD_COLOURS)
METHOD_SHAPES = ("o", "s", "^", "D", "v")

# The vertical (timeline) and horizontal (ladder) marker lines, by kind.
MARKER_STYLES: dict[str, dict[str, Any]] = {
    "trigger": {"color": "black", "linestyle": "-"},
    "detected": {"color": "0.4", "linestyle": ":"},
    "new-path": {"color": "#7b3294", "linestyle": "--"},
    "complete": {"color": "#a6611a", "linestyle": "-."},
}


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, OTHER_METHOD_COLOUR)


def _slug(*parts: str) -> str:
    return "-".join(p.replace("/", "_").replace(" ", "_") for p in parts)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


# ---------------------------------------------------------------------------------------------
# Which trial is drawn, and its marked instants (shared with experiments.ladder).


class Pick(NamedTuple):
    """The trial drawn for a scenario x method."""
    result: dict[str, Any]
    n: int          # ok trials with a handover time it was chosen from
    median: bool    # False: no trial had a handover time, the first one is drawn


def median_trial(results: Sequence[dict[str, Any]]) -> Pick:
    """The median trial by handover time (the lower middle one of an even count; ties by trial
    number); the first one if none has a handover time."""
    timed = sorted((r for r in results if r.get("handover_ms") is not None),
                   key=lambda r: (r["handover_ms"], r["trial"]))
    if not timed:
        return Pick(results[0], 0, False)
    return Pick(timed[(len(timed) - 1) // 2], len(timed), True)


def median_trials(summary: dict[str, Any]) -> list[Pick]:
    """The median trial of each scenario x method of the analysed (ok) trials, in run order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in summary.get("trials", []):
        groups.setdefault((t["scenario"], t["method"]), []).append(t)
    return [median_trial(rows) for rows in groups.values()]


def caption(pick: Pick) -> str:
    """'link-planned / proposed — trial 3, the median handover of 5 trials' (of an even count:
    'the lower median')."""
    r = pick.result
    median = "median" if pick.n % 2 else "lower median"
    which = (f"trial {r['trial']}, the {median} handover of {pick.n} trials" if pick.median
             else f"trial {r['trial']} (no trial has a handover time)")
    return f"{r['scenario']} / {r['method']} — {which}"


@dataclass(frozen=True)
class Marker:
    t_ms: float  # from the trigger
    kind: str    # a key of MARKER_STYLES
    label: str


def markers(result: dict[str, Any]) -> list[Marker]:
    """The trigger, the mover's detection (fault scenarios), the first RTP on the new path and
    the completion of a trial, in time order; the ones not measured are left out."""
    fault = result.get("scenario") in FAULT_SCENARIOS
    out = [Marker(0.0, "trigger", "trigger: fault injected" if fault else "trigger: command")]
    if fault and result.get("detection_ms") is not None:
        out.append(Marker(result["detection_ms"], "detected",
                          f"{result.get('mover') or 'the mover'} detects the fault"))
    if result.get("handover_ms") is not None:
        out.append(Marker(result["handover_ms"], "new-path",
                          "first RTP on the new path (handover)"))
    if result.get("t_complete_ms") is not None:
        out.append(Marker(result["t_complete_ms"], "complete", "procedure's last message"))
    return sorted(out, key=lambda m: m.t_ms)


# ---------------------------------------------------------------------------------------------
# Timelines.


@dataclass(frozen=True, order=True)
class Lane:
    """One direction of the call on one path; sorts by direction, then old before new."""
    direction: tuple[str, str]  # (sending side, receiving side): ("a", "b") or ("b", "a")
    new: bool                   # an end of it is a new address (a1_new, or a new terminal)
    src: str
    dst: str


def _side_of(trial: Trial) -> dict[str, tuple[str, bool]]:
    """Address -> (side, new?) of the trial's terminals."""
    out: dict[str, tuple[str, bool]] = {}
    for side, terms in trial.sides().items():
        for term in terms:
            fresh = term != trial.old.get(side)
            for key, ip in trial.addresses.items():
                if key == term or key.startswith(term + "_"):
                    out[ip] = (side, fresh or key.endswith("_new"))
    return out


def rtp_lanes(trial: Trial, packets: Iterable[Rtp]) -> dict[Lane, list[float]]:
    """RTP between the two sides of the call -> ms from the trigger, per lane (src -> dst);
    packets to or from anything else are left out."""
    sides = _side_of(trial)
    lanes: dict[Lane, list[float]] = {}
    for r in packets:
        src, dst = sides.get(r.src), sides.get(r.dst)
        if src is None or dst is None or src[0] == dst[0]:
            continue
        lane = Lane((src[0], dst[0]), src[1] or dst[1], r.src, r.dst)
        lanes.setdefault(lane, []).append((r.t_ns - trial.t_trigger_ns) / 1e6)
    return lanes


def network_of(ip: str) -> str:
    """The access or core network of an address in the default topology ('' if none)."""
    try:
        from topologies.m2m import M2M_NETWORKS
    except ImportError:
        return ""
    prefix = ip.rpartition(".")[0]
    return next((net for net, (p, _) in M2M_NETWORKS.items() if p == prefix), "")


def lane_label(lane: Lane, names: dict[str, str]) -> str:
    def end(ip: str) -> str:
        net = network_of(ip)
        return f"{names.get(ip, '?')} {ip}" + (f" ({net})" if net else "")
    return f"{end(lane.src)} → {end(lane.dst)}"


def _received(trial: Trial, data: RunData, t0: int, t1: int) -> list[Rtp]:
    """RTP as it arrived at each of the trial's terminals (their own captures)."""
    return [r for term in sorted(trial.terminals()) for r in data.rtp(term, t0, t1)
            if r.dst in trial.addrs(term)]


def _draw_lanes(ax: Axes, lanes: dict[Lane, list[float]], names: dict[str, str],
                colour: str) -> None:
    order = sorted(lanes)
    for y, lane in enumerate(order):
        xs = lanes[lane]
        ax.plot(xs, [y] * len(xs), "|", markersize=12, markeredgewidth=1.5,
                color=colour if lane.new else OLD_PATH_COLOUR)
        if lane.new and xs:
            first = min(xs)
            ax.plot([first], [y - 0.38], "v", color=colour, markersize=7)
            ax.annotate(f"{first:+.0f} ms", (first, y - 0.38), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=7, color=colour,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.3})
    for y in range(1, len(order)):  # a rule between the two directions
        if order[y].direction != order[y - 1].direction:
            ax.axhline(y - 0.5, color="0.8", linewidth=0.8)
    ax.set_yticks(range(len(order)), [lane_label(lane, names) for lane in order], fontsize=8)
    ax.set_ylim(len(order) - 0.4, -0.8)  # the first lane on top


def _draw_markers(ax: Axes, marks: Sequence[Marker]) -> list[Line2D]:
    return [ax.axvline(m.t_ms, linewidth=1.2, label=f"{m.label} ({m.t_ms:+.0f} ms)",
                       **MARKER_STYLES[m.kind]) for m in marks]


def timeline(pick: Pick, data: RunData, out: Path) -> Path:
    """One trial's RTP arrivals per direction and path (see the module docstring)."""
    result = pick.result
    trial = _trial(result)
    trig = trial.t_trigger_ns
    done = max(result.get("t_complete_ms") or 0.0, result.get("handover_ms") or 0.0)
    t0 = max(trial.t_start_ns, trig - int(MARGIN_MS * 1e6))
    t1 = min(trial.t_end_ns, trig + int((done + MARGIN_MS) * 1e6))
    lanes = rtp_lanes(trial, _received(trial, data, t0, t1))
    colour = method_colour(trial.method)
    marks = markers(result)
    height = 1.3 + 0.5 * max(1, len(lanes))
    fig, (ax, zoom) = plt.subplots(2, 1, figsize=(11, 2 * height + 1.2), layout="constrained")
    for axis in (ax, zoom):
        _draw_lanes(axis, lanes, node_names(trial), colour)
        handles = _draw_markers(axis, marks)
        axis.set_xlabel("ms from the trigger")
        axis.grid(axis="x", alpha=0.3)
    # The marks fall within some tens of ms of each other: the lower panel zooms in on them.
    ends = [m.t_ms for m in marks] + [done]
    zoom.set_xlim(min(ends) - ZOOM_MARGIN_MS, max(ends) + ZOOM_MARGIN_MS)
    zoom.set_title(f"the switch, zoomed in ({ZOOM_MARGIN_MS:.0f} ms either side of its marks)",
                   fontsize=9)
    handles += [Line2D([], [], color=OLD_PATH_COLOUR, marker="|", linestyle="",
                       markersize=10, label="RTP on the old path"),
                Line2D([], [], color=colour, marker="|", linestyle="", markersize=10,
                       label=f"RTP on the new path ({trial.method})"),
                Line2D([], [], color=colour, marker="v", linestyle="",
                       label="first packet of a direction on its new path")]
    ax.set_title(f"{caption(pick)}\nRTP arrivals per direction and path — handover "
                 f"{_fmt(result.get('handover_ms'))} ms, max gap {_fmt(result.get('gap_ms'))} "
                 f"ms, lost {result.get('lost')}", fontsize=10)
    zoom.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3,
                fontsize=8, frameon=False)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _trial(result: dict[str, Any]) -> Trial:
    return Trial.from_json({k: v for k, v in result.items() if k in Trial.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Gap CDFs.


def gap_curves(summary: dict[str, Any], family: str
               ) -> dict[str, dict[str, list[float]]]:
    """scenario -> method -> the sorted per-receiver media gaps (ms) of the family's trials;
    scenarios and methods in the figures' order."""
    raw: dict[str, dict[str, list[float]]] = {}
    for t in summary.get("trials", []):
        if t.get("family") == family:
            gaps = [r["gap_ms"] for r in t["receivers"].values() if r["gap_ms"] is not None]
            raw.setdefault(t["scenario"], {}).setdefault(t["method"], []).extend(gaps)
    scn_rank = {s: i for i, s in enumerate(LINK_SCENARIOS)}
    out: dict[str, dict[str, list[float]]] = {}
    for scn in sorted(raw, key=lambda s: (scn_rank.get(s, len(scn_rank)), s)):
        methods = sorted(raw[scn], key=_method_rank)
        out[scn] = {m: sorted(raw[scn][m]) for m in methods if raw[scn][m]}
    return {s: c for s, c in out.items() if c}


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def x_limits(values: Iterable[float], pad: float = 0.08, min_pad_ms: float = 3.0
             ) -> tuple[float, float]:
    """The data's range with a margin (at least `min_pad_ms` each side), not below 0."""
    xs = list(values)
    lo, hi = min(xs), max(xs)
    margin = max((hi - lo) * pad, min_pad_ms)
    return max(0.0, lo - margin), hi + margin


def _cdf_panel(ax: Axes, scenario: str, curves: dict[str, list[float]]) -> None:
    for i, (method, xs) in enumerate(curves.items()):
        ys = [(k + 1) / len(xs) for k in range(len(xs))]
        colour = method_colour(method)
        ax.step([xs[0], *xs], [0.0, *ys], where="post", color=colour, linewidth=1.6,
                label=f"{method} ({len(xs)} receiver gaps, median {percentile(xs, 50):.0f} ms)")
        ax.plot(xs, ys, METHOD_SHAPES[i % len(METHOD_SHAPES)], color=colour, markersize=4)
    ax.set_xlim(*x_limits(x for xs in curves.values() for x in xs))
    ax.set_ylim(0, 1.05)
    ax.set_title(scenario, fontsize=10)
    ax.set_xlabel("media gap at a receiver, per trial (ms); the table gives the largest")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")


def gap_cdf(summary: dict[str, Any], family: str, out: Path) -> Path | None:
    """CDF of the per-receiver media gaps of `family`: a panel per scenario, a curve per
    method."""
    panels = gap_curves(summary, family)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 0.6, 4.2),
                             sharey=True, squeeze=False)
    for ax, (scenario, curves) in zip(axes[0], panels.items(), strict=True):
        _cdf_panel(ax, scenario, curves)
    axes[0][0].set_ylabel("fraction of receivers x trials")
    note = " (each panel its own x range)" if len(panels) > 1 else ""
    fig.suptitle(f"{family} switches: CDF of the longest RTP gap per receiver{note}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------


def draw_plots(run_dir: str | Path, summary: dict[str, Any], data: RunData | None = None,
               workers: int = 2) -> list[Path]:
    """Every timeline and CDF of an analysed run (`summary` from analysis.analyze); returns
    the PNG paths. The captures come from the analysis cache (no second tshark pass)."""
    run = Path(run_dir)
    out_dir = run / "plots"
    out_dir.mkdir(exist_ok=True)
    picks = median_trials(summary)
    if data is None:
        hosts = {h for p in picks for h in _trial(p.result).terminals()}
        data = load_run(run, hosts, workers)
    pngs = [timeline(p, data, out_dir / "timeline-{}.png".format(
        _slug(p.result["scenario"], p.result["method"]))) for p in picks]
    families: Sequence[str] = sorted({t.get("family", "") for t in summary.get("trials", [])})
    for fam in families:
        png = gap_cdf(summary, fam, out_dir / f"gap-cdf-{_slug(fam)}.png")
        if png:
            pngs.append(png)
    return pngs
