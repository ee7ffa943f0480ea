"""Command-line runner of the lab.

    python -m experiments.runner probe [--seconds 10] [--fault wlan:wlan-a1:down@3:6 ...]
    python -m experiments.runner lab          # the lab's CLI: every node up, node/fault commands
    python -m experiments.runner capabilities # what this kernel offers, and the choices made

Everything a run writes goes to captures/<run-id>/. Ctrl-C, SIGTERM or a closed terminal
(SIGHUP) stops cleanly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from experiments.capabilities import probe
from experiments.console import guard, stop_signal
from experiments.lab import Lab, LabError, config_problem, read_jsonl
from topologies.m2m import M2M_HOSTS, M2M_NETWORKS

MAX_SECONDS = 3600.0
MAX_RATE = 1000.0  # probe packets/s per path


def switch_ports() -> dict[str, list[str]]:
    """Each OVS switch of the topology and its ports (`<switch>-<host>`, `<switch>-r0`)."""
    ports = {net: [f"{net}-r0"] for net in M2M_NETWORKS}
    for host, nets in M2M_HOSTS.items():
        for net, _ in nets:
            ports[net].append(f"{net}-{host}")
    return ports


def _bounded(text: str, what: str, maximum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= maximum:
        raise argparse.ArgumentTypeError(
            f"expected {what} greater than 0 and at most {maximum:g}, got {text!r}")
    return value


def probe_seconds(text: str) -> float:
    """--seconds: 0 < S <= MAX_SECONDS (argparse type)."""
    return _bounded(text, "seconds", MAX_SECONDS)


def probe_rate(text: str) -> float:
    """--rate: 0 < packets/s <= MAX_RATE (argparse type)."""
    return _bounded(text, "packets/s", MAX_RATE)


@dataclass(frozen=True)
class FaultPlan:
    """`switch:port:kind@start[:end]` — inject at `start` s, restore at `end` s (if given)."""

    switch: str
    port: str
    kind: str
    start: float
    end: float | None

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        where, sep, when = text.partition("@")
        parts = where.split(":")
        if not sep or len(parts) != 3 or not all(parts):
            raise argparse.ArgumentTypeError(
                f"fault {text!r}: expected SWITCH:PORT:KIND@START[:END], e.g. wlan:wlan-a1:down@3:6"
            )
        times = when.split(":")
        try:
            start = float(times[0])
            end = float(times[1]) if len(times) > 1 else None
        except ValueError:
            raise argparse.ArgumentTypeError(f"fault {text!r}: times must be seconds") from None
        if not all(math.isfinite(t) for t in (start, end or 0.0)):
            raise argparse.ArgumentTypeError(f"fault {text!r}: times must be finite seconds")
        if len(times) > 2 or start < 0 or (end is not None and end <= start):
            raise argparse.ArgumentTypeError(f"fault {text!r}: need 0 <= START < END")
        ports = switch_ports()
        switch, port, kind = parts
        if switch not in ports:
            raise argparse.ArgumentTypeError(
                f"fault {text!r}: no switch {switch!r}; switches: {', '.join(ports)}")
        if port not in ports[switch]:
            raise argparse.ArgumentTypeError(
                f"fault {text!r}: no port {port!r} on {switch}; its ports: "
                f"{', '.join(ports[switch])}")
        if kind not in ("down", "blackhole"):
            raise argparse.ArgumentTypeError(f"fault {text!r}: kind must be down or blackhole")
        return cls(switch, port, kind, start, end)


def run_probe(args: argparse.Namespace) -> int:
    with Lab(name="probe") as lab:
        a1_log, b1_log = lab.start_probe(rate=args.rate)
        assert lab.faults is not None
        t0 = time.monotonic()
        events: list[tuple[float, str, FaultPlan]] = []
        for plan in args.fault:
            events.append((plan.start, "inject", plan))
            if plan.end is not None:
                events.append((plan.end, "restore", plan))
        events.sort(key=lambda e: e[0])
        active: dict[FaultPlan, int] = {}
        for at, action, plan in events:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            if action == "inject":
                fault = lab.faults.inject(plan.switch, plan.port, plan.kind)
                active[plan] = fault["id"]
                lab.say(f"t={at:g}s injected {plan.kind} on {plan.switch}/{plan.port}")
            else:
                lab.faults.restore(active.pop(plan))
                lab.say(f"t={at:g}s restored {plan.switch}/{plan.port}")
        time.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
    summary = probe_summary(a1_log, b1_log)
    assert lab.run_dir is not None
    (lab.run_dir / "probe-summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    print(f"results in {lab.run_dir} (this table: probe-summary.txt)")
    return 0


LATE_MS = 100.0  # a probe this much later than sent was held somewhere (a queue at a downed port)


def probe_summary(a1_log: Path, b1_log: Path) -> list[str]:
    """Per path: sent, received at b1, lost, echoed back; and how many arrived late (a port
    that goes down queues what is sent to it and delivers it at restore), with the worst
    delay."""
    rx = [r for r in read_jsonl(b1_log) if r.get("event") == "rx"]
    received = Counter(r["path"] for r in rx)
    echoed = Counter(r["path"] for r in read_jsonl(a1_log) if r.get("event") == "echo-rx")
    sent = Counter(r["path"] for r in read_jsonl(a1_log) if r.get("event") == "tx")
    delays: dict[str, list[float]] = {}
    for r in rx:
        delays.setdefault(r["path"], []).append((r["t_ns"] - r["sent_ns"]) / 1e6)
    lines = [f"{'path':6} {'sent':>6} {'at b1':>6} {'lost':>6} {'echoed':>6} {'late':>6} "
             f"{'max delay':>10}"]
    for path in sorted(sent):
        ds = delays.get(path, [])
        late = sum(1 for d in ds if d > LATE_MS)
        worst = f"{max(ds):.1f} ms" if ds else "–"
        lost = max(0, sent[path] - received[path])
        lines.append(f"{path:6} {sent[path]:6d} {received[path]:6d} {lost:6d} {echoed[path]:6d} "
                     f"{late:6d} {worst:>10}")
    lines.append(f"late: received more than {LATE_MS:g} ms after sending")
    return lines


def run_cli(args: argparse.Namespace) -> int:
    from experiments import labcli

    with Lab(name="lab", mininet_log="info") as lab:
        lab.start_probe()
        assert lab.faults is not None
        print(f"controller REST API: {lab.faults.base_url}/lab/faults  "
              f"(e.g. curl -X POST -d '{{\"switch\":\"wlan\",\"port\":\"wlan-a1\","
              f"\"kind\":\"down\"}}' {lab.faults.base_url}/lab/faults)")
        labcli.run(lab)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.runner",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="boot the lab, run probe streams, inject faults")
    p.add_argument("--seconds", type=probe_seconds, default=10.0,
                   help=f"how long the probes run (0 < S <= {MAX_SECONDS:g}; default 10)")
    p.add_argument("--rate", type=probe_rate, default=50.0,
                   help=f"probe packets/s per path (0 < R <= {MAX_RATE:g}; default 50)")
    p.add_argument("--fault", type=FaultPlan.parse, action="append", default=[],
                   help="SWITCH:PORT:KIND@START[:END], repeatable; KIND down or blackhole, "
                        "e.g. wlan:wlan-a1:down@3:6 (ports: <switch>-<host>, <switch>-r0)")
    sub.add_parser("lab", help="the Mininet CLI with every node running and registered, "
                               "plus node/nodes/fault commands")
    sub.add_parser("capabilities", help="probe the kernel and print the choices")
    args = parser.parse_args(argv)
    if args.command == "probe":
        late = [f for f in args.fault if max(f.start, f.end or 0.0) > args.seconds]
        if late:
            parser.error(f"fault(s) after the end of the run (--seconds {args.seconds:g}): "
                         f"{', '.join(f'{f.switch}:{f.port}@{f.start:g}' for f in late)}")
    if args.command == "lab":  # the probe runs no node that reads the config files
        problem = config_problem()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if args.command == "capabilities":
        caps = probe()
        print(caps.summary())
        print(json.dumps(caps.to_dict(), indent=2))
        return 0
    guard()
    try:
        return {"probe": run_probe, "lab": run_cli}[args.command](args)
    except KeyboardInterrupt as exc:
        print(f"interrupted by {stop_signal(exc)}: the lab was torn down", file=sys.stderr)
        return 130
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
