"""Ladder diagrams (message sequence charts like the paper's Figs 3 and 4) drawn from the
captured, decrypted SIP of a trial's procedure at the proxy — every terminal<->server message
crosses it, so its capture holds every leg. One PNG per scenario x method (first ok trial):
``plots/ladder-<scenario>-<method>.png``; lanes for the nodes involved (a terminal with two
interfaces gets a lane per interface), an arrow per message with its method or status and the
SMIG type of its JSON body, time flowing downwards (one row per message, the time from the
trigger on the left; retransmissions dashed in red).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend is chosen first

from experiments.plots import _slug, first_trials

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


def ladder(result: dict[str, Any], out: Path) -> Path:
    """One trial's procedure as a message sequence chart."""
    msgs = result.get("message_list") or []
    lanes = lane_names(msgs)
    order = sorted(set(lanes.values()), key=_lane_key)
    x = {lane: i for i, lane in enumerate(order)}
    rows = len(msgs)
    fig, ax = plt.subplots(figsize=(2.0 + 1.9 * max(2, len(order)), 1.6 + 0.32 * rows))
    for lane, i in x.items():
        ax.plot([i, i], [-0.8, rows], color="0.55", linewidth=1)
        ax.text(i, -1.0, lane, ha="center", va="bottom", fontsize=9, fontweight="bold")
    for row, m in enumerate(msgs):
        a = x[lanes[m.get("src_ip") or m["src"]]]
        b = x[lanes[m.get("dst_ip") or m["dst"]]]
        again = m.get("retransmission")
        color = "tab:red" if again else ("tab:blue" if m["label"][0].isalpha() else "0.35")
        ax.annotate("", xy=(b, row), xytext=(a, row),
                    arrowprops={"arrowstyle": "-|>", "color": color, "linewidth": 1.1,
                                "linestyle": "--" if again else "-"})
        label = m["label"] + (" (retransmission)" if again else "")
        ax.text((a + b) / 2, row - 0.12, label, ha="center", va="bottom", fontsize=7.5,
                color=color)
        ax.text(-0.6, row, f"{m['t_ms']:+.1f} ms", ha="right", va="center", fontsize=7,
                color="0.3")
    ax.set_xlim(-1.4, len(order) - 0.4)
    ax.set_ylim(rows + 0.3, -1.6)
    ax.axis("off")
    ax.set_title(f"{result['scenario']} / {result['method']} (trial {result['trial']}): "
                 f"{result.get('messages')} messages at the proxy, handover "
                 f"{_fmt(result.get('handover_ms'))} ms", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def draw_ladders(run_dir: str | Path, summary: dict[str, Any]) -> list[Path]:
    """A ladder for the first ok trial of each scenario x method of an analysed run."""
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    return [ladder(t, out_dir / f"ladder-{_slug(t['scenario'], t['method'])}.png")
            for t in first_trials(summary) if t.get("message_list")]
