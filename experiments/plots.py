"""Plots of an analysed run (matplotlib, Agg backend, PNGs under <run>/plots/):

* ``timeline-<scenario>-<method>.png`` — RTP arrivals per path around the switch (first ok
  trial): x = ms from the trigger, one lane per receiving terminal and sender address, a dot
  per packet (from the decrypted captures), lines at the trigger, the first packet on the new
  path and the completion of the procedure;
* ``gap-cdf-<family>.png`` — CDF of the media gap (per receiver, ok trials) per scenario x
  method of a family.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend is chosen first

from experiments.analysis import RunData, Trial, load_run, node_names

MARGIN_MS = 600.0  # shown before the trigger and after the completion


def _slug(*parts: str) -> str:
    return "-".join(p.replace("/", "_").replace(" ", "_") for p in parts)


def first_trials(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The first ok trial of each scenario x method, in the run's order."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for t in summary.get("trials", []):
        seen.setdefault((t["scenario"], t["method"]), t)
    return list(seen.values())


def _trial(result: dict[str, Any]) -> Trial:
    return Trial.from_json({k: v for k, v in result.items() if k in Trial.__dataclass_fields__})


def timeline(result: dict[str, Any], data: RunData, out: Path) -> Path:
    """One trial's RTP arrivals per receiver and sender address (see the module docstring)."""
    trial = _trial(result)
    trig = trial.t_trigger_ns
    done = result.get("t_complete_ms") or 0.0
    t0 = max(trial.t_start_ns, trig - int(MARGIN_MS * 1e6))
    t1 = min(trial.t_end_ns, trig + int((done + MARGIN_MS) * 1e6))
    names = node_names(trial)
    sides = trial.sides()
    lanes: dict[str, list[float]] = {}
    for side, terms in sides.items():
        senders = {a for s, ts in sides.items() if s != side for t in ts for a in trial.addrs(t)}
        for term in terms:
            mine = trial.addrs(term)
            for r in data.rtp(term, t0, t1):
                if r.dst in mine and r.src in senders:
                    lane = f"at {term} from {names.get(r.src, '?')} {r.src}"
                    lanes.setdefault(lane, []).append((r.t_ns - trig) / 1e6)
    order = sorted(lanes)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.55 * max(1, len(order))))
    for i, lane in enumerate(order):
        ax.plot(lanes[lane], [i] * len(lanes[lane]), "|", markersize=12, markeredgewidth=1.5)
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(-0.7, len(order) - 0.3)
    marks = [(0.0, "trigger", "tab:red"), (done, "procedure complete", "tab:green")]
    if result.get("handover_ms") is not None:
        marks.append((result["handover_ms"], "first RTP on the new path", "tab:blue"))
    for x, label, color in marks:
        ax.axvline(x, color=color, linestyle="--", linewidth=1, label=f"{label} ({x:.0f} ms)")
    ax.set_xlabel("ms from the trigger")
    ax.set_title(f"{trial.scenario} / {trial.method} (trial {trial.trial}): RTP arrivals per "
                 f"path — handover {_fmt(result.get('handover_ms'))} ms, max gap "
                 f"{_fmt(result.get('gap_ms'))} ms, lost {result.get('lost')}", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(order) > 2 else -0.4),
              ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def gap_cdf(summary: dict[str, Any], family: str, out: Path) -> Path | None:
    """CDF of the per-receiver media gaps of every scenario x method of `family`."""
    curves: dict[str, list[float]] = {}
    for t in summary.get("trials", []):
        if t.get("family") == family:
            gaps = [r["gap_ms"] for r in t["receivers"].values() if r["gap_ms"] is not None]
            curves.setdefault(f"{t['scenario']} / {t['method']}", []).extend(gaps)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in sorted(curves.items()):
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step([xs[0], *xs], [0.0, *ys], where="post", label=f"{label} (n={len(xs)})")
        ax.plot(xs, ys, ".", color=ax.lines[-1].get_color())
    ax.set_xlabel("media gap at a receiver (ms)")
    ax.set_ylabel("fraction of receivers x trials")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{family} switches: CDF of the longest RTP gap per receiver")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_plots(run_dir: str | Path, summary: dict[str, Any], data: RunData | None = None,
               workers: int = 2) -> list[Path]:
    """Every timeline and CDF of an analysed run (`summary` from analysis.analyze); returns
    the PNG paths. The captures come from the analysis cache (no second tshark pass)."""
    run = Path(run_dir)
    out_dir = run / "plots"
    out_dir.mkdir(exist_ok=True)
    firsts = first_trials(summary)
    if data is None:
        hosts = {h for t in firsts for h in _trial(t).terminals()}
        data = load_run(run, hosts, workers)
    pngs = [timeline(t, data, out_dir / f"timeline-{_slug(t['scenario'], t['method'])}.png")
            for t in firsts]
    families: Sequence[str] = sorted({t.get("family", "") for t in summary.get("trials", [])})
    for fam in families:
        png = gap_cdf(summary, fam, out_dir / f"gap-cdf-{_slug(fam)}.png")
        if png:
            pngs.append(png)
    return pngs
