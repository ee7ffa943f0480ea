"""Ladder diagrams (message sequence charts like the paper's Figs 3 and 4) drawn from the
captured, decrypted SIP of a trial's procedure at the proxy — every terminal<->server message
crosses it, so its capture holds every leg. One PNG per scenario x method, for its median
trial by handover time (experiments.plots.median_trials; named in the title):
``plots/ladder-<scenario>-<method>.png``; lanes for the nodes involved (a terminal with two
interfaces gets a lane per interface), an arrow per message with its method or status and the
SMIG type of its JSON body, time flowing downwards (one row per message, the time from the
trigger on the left; retransmissions dashed in red; the rekey of Fig 3 step (9), which follows a
key-reuse switch, in green). Rows of their own, a labelled line across
the lanes in the timelines' styles, mark the trigger, the mover's detection (fault scenarios),
the first RTP on the new path (the handover) and the completion of the procedure, where the
trial record has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend is chosen first
from matplotlib.axes import Axes

from experiments.plots import (
    MARKER_STYLES,
    Marker,
    Pick,
    _fmt,
    _slug,
    caption,
    markers,
    median_trials,
)

LANE_ORDER = ("a1", "a2", "proxy", "sms", "presence", "b2", "b1")


def lane_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """IP -> lane: the node name, plus the access network for a multi-homed terminal (so a
    link switch shows which interface each message used)."""
    by_node: dict[str, set[str]] = {}
    for m in messages:
        for end in ("src", "dst"):
            by_node.setdefault(m[end], set()).add(m.get(f"{end}_ip") or m[end])
    try:
        from topologies.m2m import M2M_HOSTS, M2M_NETWORKS
        nets = {f"{M2M_NETWORKS[n][0]}.{num}": n for ints in M2M_HOSTS.values()
                for n, num in ints}
        homes = {host: len(ints) for host, ints in M2M_HOSTS.items()}
    except ImportError:
        nets, homes = {}, {}
    lanes: dict[str, str] = {}
    for node, ips in by_node.items():
        for ip in ips:
            multi = len(ips) > 1 or homes.get(node, 1) > 1
            lanes[ip] = f"{node} ({nets.get(ip, ip)})" if multi else node
    return lanes


def _lane_key(lane: str) -> tuple[int, str]:
    node = lane.split(" ")[0]
    return (LANE_ORDER.index(node) if node in LANE_ORDER else len(LANE_ORDER), lane)


Row = dict[str, Any] | Marker  # a message (of message_list) or a marked instant


def ladder_rows(result: dict[str, Any]) -> list[Row]:
    """The messages and the markers of a trial in time order: the trigger before the messages
    of its instant, the other markers after them (a completion is its last message)."""
    def key(row: Row) -> tuple[float, int]:
        if isinstance(row, Marker):
            return (row.t_ms, -1 if row.kind == "trigger" else 1)
        return (row["t_ms"], 0)
    return sorted([*(result.get("message_list") or []), *markers(result)], key=key)


def _draw_message(ax: Axes, row: int, m: dict[str, Any], a: int, b: int) -> None:
    again = m.get("retransmission")
    color = "tab:red" if again else "tab:green" if m.get("rekey") else (
        "tab:blue" if m["label"][0].isalpha() else "0.35")
    ax.annotate("", xy=(b, row), xytext=(a, row),
                arrowprops={"arrowstyle": "-|>", "color": color, "linewidth": 1.1,
                            "linestyle": "--" if again else "-"})
    label = m["label"] + (" (retransmission)" if again else "") + (
        " — step (9)" if m.get("rekey") and m["label"][0].isalpha() else "")
    ax.text((a + b) / 2, row - 0.12, label, ha="center", va="bottom", fontsize=7.5,
            color=color)


def _draw_marker(ax: Axes, row: int, mark: Marker, lanes: int) -> None:
    style = MARKER_STYLES[mark.kind]
    ax.plot([-0.3, lanes - 0.7], [row, row], linewidth=1.4, **style)
    ax.text(lanes - 0.7, row - 0.1, f"{mark.label} ({mark.t_ms:+.0f} ms)", ha="right",
            va="bottom", fontsize=7.5, fontweight="bold", color=style["color"],
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})


def ladder(pick: Pick, out: Path) -> Path:
    """One trial's procedure as a message sequence chart."""
    result = pick.result
    msgs = result.get("message_list") or []
    lanes = lane_names(msgs)
    order = sorted(set(lanes.values()), key=_lane_key)
    x = {lane: i for i, lane in enumerate(order)}
    rows = ladder_rows(result)
    fig, ax = plt.subplots(figsize=(2.0 + 1.9 * max(2, len(order)), 1.8 + 0.32 * len(rows)))
    for lane, i in x.items():
        ax.plot([i, i], [-0.8, len(rows)], color="0.55", linewidth=1)
        ax.text(i, -1.0, lane, ha="center", va="bottom", fontsize=9, fontweight="bold")
    for y, row in enumerate(rows):
        if isinstance(row, Marker):
            _draw_marker(ax, y, row, len(order))
            t_ms, color = row.t_ms, MARKER_STYLES[row.kind]["color"]
        else:
            _draw_message(ax, y, row, x[lanes[row.get("src_ip") or row["src"]]],
                          x[lanes[row.get("dst_ip") or row["dst"]]])
            t_ms, color = row["t_ms"], "0.3"
        ax.text(-0.6, y, f"{t_ms:+.1f} ms", ha="right", va="center", fontsize=7, color=color)
    ax.set_xlim(-1.4, len(order) - 0.4)
    ax.set_ylim(len(rows) + 0.3, -1.6)
    ax.axis("off")
    rekey = (f" (+ {result['rekey_messages']} of the rekey, step (9))"
             if result.get("rekey_messages") else "")
    ax.set_title(f"{caption(pick)}\n{result.get('messages')} messages at the proxy{rekey}, "
                 f"handover {_fmt(result.get('handover_ms'))} ms", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_ladders(run_dir: str | Path, summary: dict[str, Any]) -> list[Path]:
    """A ladder for the median trial of each scenario x method of an analysed run."""
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    return [ladder(p, out_dir / f"ladder-{_slug(p.result['scenario'], p.result['method'])}.png")
            for p in median_trials(summary) if p.result.get("message_list")]
