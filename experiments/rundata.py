"""One run's captures for the analysis: every pcap through tshark once (in parallel, cached
under <run>/analysis/, ESP decrypted with the run's esp_sa), indexed by host and time, with
what could not be read listed as problems; and the default topology's node names."""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.capture import (
    Capture,
    CaptureError,
    Rtp,
    Sip,
    esp_sa_options,
    load_capture,
)
from experiments.records import FAULT_SCENARIOS, RunLogs, Trial


class _Timeline:
    """Items sorted by t_ns, sliced by time with bisect (trials are short windows of long
    captures)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = sorted(items, key=lambda i: i.t_ns)
        self.times = [i.t_ns for i in self.items]

    def between(self, t0: int, t1: int) -> list[Any]:
        from bisect import bisect_left, bisect_right
        return self.items[bisect_left(self.times, t0):bisect_right(self.times, t1)]


@dataclass
class RunData:
    run_dir: Path
    captures: dict[str, Capture]
    logs: RunLogs
    _rtp: dict[str, _Timeline] = field(default_factory=dict)
    _sip: dict[str, _Timeline] = field(default_factory=dict)
    _rx: dict[str, _Timeline] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # captures that could not be read

    def __post_init__(self) -> None:
        for name, cap in self.captures.items():
            self._rtp[name], self._sip[name] = _Timeline(cap.rtp), _Timeline(cap.sip)
        for node in self.logs.media:
            self._rx[node] = _Timeline(self.logs.rtp_rx(node))

    def capture_names(self, host: str) -> list[str]:
        return sorted(n for n in self.captures if n.startswith(host + "-"))

    def rtp(self, host: str, t0: int, t1: int) -> list[Rtp]:
        """RTP in all of `host`'s captures in [t0, t1], time order."""
        rows = [r for n in self.capture_names(host) for r in self._rtp[n].between(t0, t1)]
        return sorted(rows, key=lambda r: r.t_ns)

    def sip(self, host: str, t0: int, t1: int) -> list[Sip]:
        rows = [s for n in self.capture_names(host) for s in self._sip[n].between(t0, t1)]
        return sorted(rows, key=lambda s: s.t_ns)

    def rtp_rx(self, node: str, t0: int, t1: int) -> list[Rtp]:
        tl = self._rx.get(node)
        return tl.between(t0, t1) if tl else []


def _capture_affects(host: str) -> str:
    if host == "proxy":
        return "the SIP messages and bytes at the proxy"
    return (f"{host}'s RTP on the wire (media gap, loss, handover where {host} receives) "
            f"and the SIP it sent")


def _esp_options(run_dir: Path, esp_in_use: bool) -> tuple[list[str], list[str]]:
    """The esp_sa file's tshark options and what is wrong with it."""
    path = run_dir / "esp_sa"
    if not path.exists():
        return [], ["esp_sa is missing, though the run used ESP: SIP and RTP inside ESP not "
                    "decrypted (messages, RTP and handover times undercount)"] if esp_in_use else []
    try:
        options, problems = esp_sa_options(path)
    except CaptureError as exc:
        return [], [str(exc)]
    if not esp_in_use:
        problems = [p for p in problems if "no usable rows" not in p]
    return options, problems


def load_run(run_dir: Path, hosts: Iterable[str] | None = None, workers: int = 2,
             esp_in_use: bool = False) -> RunData:
    """Every capture of the proxy and of `hosts` (default: all but the router and the other
    servers), through tshark in parallel, plus the logs. A capture that cannot be read is a
    problem naming it (and what it affects); the rest are analysed."""
    logs = RunLogs.load(run_dir)
    ports = sorted(logs.media_ports())
    wanted = set(hosts) if hosts is not None else None
    pcaps = [p for p in sorted((run_dir / "pcaps").glob("*.pcap"))
             if p.stem.startswith("proxy-")
             or (wanted is not None and p.stem.split("-")[0] in wanted)
             or (wanted is None and p.stem.split("-")[0] not in ("r0", "sms", "presence"))]
    esp, problems = _esp_options(run_dir, esp_in_use)
    cache = run_dir / "analysis"

    def one(pcap: Path) -> Capture | str:
        try:
            return load_capture(pcap, run_dir / "esp_sa", ports, cache, esp)
        except CaptureError as exc:
            return f"{exc}: not analysed ({_capture_affects(pcap.stem.split('-')[0])})"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        loaded = list(pool.map(one, pcaps))
    caps = [c for c in loaded if isinstance(c, Capture)]
    problems += [c for c in loaded if isinstance(c, str)]
    problems += [p for c in caps for p in c.problems]
    for host in sorted((wanted or set()) | {"proxy"}):
        if not any(p.stem.split("-")[0] == host for p in pcaps):
            problems.append(f"no capture of {host} in pcaps/ (pcaps/{host}-*.pcap missing): "
                            f"{_capture_affects(host)} not measured")
    problems += _missing_manifest_captures(run_dir, wanted, pcaps)
    return RunData(run_dir, {c.name: c for c in caps}, logs, problems=problems)


def _missing_manifest_captures(run_dir: Path, wanted: set[str] | None, pcaps: list[Path]
                               ) -> list[str]:
    """Captures the lab ran tcpdump for (its manifest) whose pcap is not in pcaps/."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        procs = manifest.get("processes") or {}
        names = [k.removeprefix("tcpdump-") for k in procs if k.startswith("tcpdump-")]
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    have = {p.stem for p in pcaps}
    out = []
    for name in sorted(names):
        host = name.split("-")[0]
        if name in have or not (host == "proxy" or (wanted is not None and host in wanted)):
            continue
        if any(p.stem.split("-")[0] == host for p in pcaps):  # not all of the host's are gone
            out.append(f"pcaps/{name}.pcap is missing (the lab captured it): "
                       f"{_capture_affects(host)} on that interface not measured")
    return out


def missing_logs(run_dir: Path, trials: Iterable[Trial], logs: RunLogs) -> list[str]:
    """The event and media logs the trials need that are not in the run folder."""
    events: set[str] = set()
    media: set[str] = set()
    for t in trials:
        events |= t.terminals()
        media |= t.terminals()
        if t.family == "terminal":
            events.add("sms")
        if t.scenario.partition("-rtt")[0] in FAULT_SCENARIOS:
            events.add("controller")
    out = []
    for node in sorted(events - set(logs.events)):
        why = "not a file" if (run_dir / "events" / f"{node}.jsonl").exists() else "missing"
        out.append(f"events/{node}.jsonl is {why}: {node}'s procedure events are not in the "
                   "analysis (its detection, signalling and the capture vs event log checks "
                   "are not measured)")
    for node in sorted(media - set(logs.media)):
        path = run_dir / "media" / f"{node}-media.jsonl"
        why = "not a file" if path.exists() else "missing"
        out.append(f"media/{node}-media.jsonl is {why}: app lost and the media checks at "
                   f"{node} are not measured")
    return out


def node_names(trial: Trial | None = None) -> dict[str, str]:
    """IP address -> node name: the default topology's, then the trial's own addresses."""
    names: dict[str, str] = {}
    try:
        from topologies.m2m import M2M_HOSTS, M2M_NETWORKS
        for host, intfs in M2M_HOSTS.items():
            for net, num in intfs:
                names[f"{M2M_NETWORKS[net][0]}.{num}"] = host
    except ImportError:  # mininet missing: the trial's addresses still name the terminals
        pass
    for key, ip in (trial.addresses if trial else {}).items():
        names[ip] = key.split("_")[0]
    return names
