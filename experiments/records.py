"""A run's records: the trial records (trials.jsonl, validated field by field into `Trial`)
and the nodes' event logs (events/*.jsonl, media/*.jsonl), indexed by node and time. Bad
lines are named by file and line and left out, never fatal."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.capture import (
    Rtp,
)

FAULT_SCENARIOS = ("link-carrier-loss", "link-blackhole")
SWITCHED_PORTS = (41000, 41002)  # media ports of switched-in (Fig 3) sessions


def read_jsonl(path: Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """JSON lines of a log; a torn last line (process killed mid-write) is skipped. A file
    that cannot be read, and lines that are not JSON objects with an int t_ns (other than a
    torn last line), are reported in `problems` (naming the file), once per file."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    name = f"{path.parent.name}/{path.name}"
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        if problems is not None:
            problems.append(f"{name} cannot be read ({exc.strerror or exc}): its events "
                            "are missing from the analysis")
        return rows
    bad: list[int] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode())
        except ValueError:  # UnicodeDecodeError is one
            row = None
        if isinstance(row, dict) and isinstance(row.get("t_ns"), int):
            rows.append(row)
        elif n < len(lines) - 1 or line.endswith(b"}"):  # not a torn last line
            bad.append(n)
    if bad and problems is not None:
        problems.append(f"{name}: {len(bad)} line(s) skipped, not a JSON object with an "
                        f"int t_ns (line {', '.join(map(str, bad[:5]))}"
                        f"{', ...' if len(bad) > 5 else ''})")
    return rows


def _rx_row(e: dict[str, Any]) -> Rtp:
    ip, _, port = str(e.get("src", "")).rpartition(":")
    return Rtp(e["t_ns"], ip, int(port or 0), str(e.get("dst", "")), 0,
               int(e.get("ssrc", 0)), int(e.get("seq", 0)))


@dataclass
class RunLogs:
    events: dict[str, list[dict[str, Any]]]   # node -> events/<node>.jsonl
    media: dict[str, list[dict[str, Any]]]    # node -> media/<node>-media.jsonl
    problems: list[str] = field(default_factory=list)  # files or lines that could not be read

    @classmethod
    def load(cls, run_dir: Path) -> RunLogs:
        problems: list[str] = []
        events = {p.stem: read_jsonl(p, problems)
                  for p in sorted((run_dir / "events").glob("*.jsonl"))}
        media = {p.name.removesuffix("-media.jsonl"): read_jsonl(p, problems)
                 for p in sorted((run_dir / "media").glob("*-media.jsonl"))}
        logs = cls(events, media, problems)
        for node in media:  # bad rtp-rx rows are reported (and skipped) now, once
            logs.rtp_rx(node)
        return logs

    def rtp_rx(self, node: str) -> list[Rtp]:
        rows, bad = [], []
        media = self.media.get(node, [])
        for e in media:
            if e.get("event") == "rtp-rx":
                try:
                    rows.append(_rx_row(e))
                except (ValueError, TypeError) as exc:
                    bad.append(str(exc))
        if bad:  # dropped from the log, so that they are reported once
            self.media[node] = [e for e in media if e.get("event") != "rtp-rx"
                                or not _rx_row_bad(e)]
            self.problems.append(f"media/{node}-media.jsonl: {len(bad)} rtp-rx row(s) "
                                 f"skipped, bad src, ssrc or seq ({bad[0]})")
        return rows

    def media_ports(self) -> set[int]:
        ports = set(SWITCHED_PORTS)
        for rows in self.media.values():
            for e in rows:
                if e.get("event") == "fig2-media-sas":
                    for end in ("local", "remote"):
                        port = str(e.get(end, "")).rpartition(":")[2]
                        if port.isdigit():
                            ports.add(int(port))
        return ports

    def find(self, nodes: Iterable[str] | None, t0: int, t1: int, **match: Any
             ) -> list[dict[str, Any]]:
        """Events of `nodes` (all if None) in [t0, t1] whose fields equal `match`, in time
        order."""
        names = self.events.keys() if nodes is None else nodes
        found = [e for n in names for e in self.events.get(n, [])
                 if t0 <= e["t_ns"] <= t1 and all(e.get(k) == v for k, v in match.items())]
        return sorted(found, key=lambda e: e["t_ns"])


def _rx_row_bad(e: dict[str, Any]) -> bool:
    try:
        _rx_row(e)
    except (ValueError, TypeError):
        return True
    return False


SCENARIO_ORDER = ("link-planned", "link-carrier-loss", "link-blackhole", "terminal-switch")
METHOD_ORDER = ("proposed", "register-then-switch", "reinvite", "reuse", "renegotiate")
_TERMINAL_RE = re.compile(r"[a-z][a-z0-9]*")


def _scenario_known(name: str) -> bool:
    """An experiment's scenario, or its delay sweep's ('link-planned-rtt100')."""
    base, sep, rtt = name.partition("-rtt")
    return base in SCENARIO_ORDER and (not sep or rtt.isdigit())


def _check_mapping(name: str, value: Any, key_re: re.Pattern[str] | None = None) -> None:
    """`value` is a JSON object of strings (keys matching `key_re`)."""
    if not isinstance(value, dict):
        raise ValueError(f"trial field {name!r} is {type(value).__name__} {value!r:.60}, "
                         "not an object of strings")
    for k, v in value.items():
        if not isinstance(v, str) or not v:
            raise ValueError(f"trial field {name!r}: {k!r} is {v!r:.40}, not a string")
        if key_re is not None and not key_re.fullmatch(k):
            raise ValueError(f"trial field {name!r}: key {k!r} is not a side name")


@dataclass(frozen=True)
class Trial:
    """One line of trials.jsonl (written by the runner)."""
    scenario: str
    method: str
    trial: int
    ok: bool
    error: str | None = None
    family: str = "link"
    session: str = ""
    t_start_ns: int = 0
    t_trigger_ns: int = 0
    t_end_ns: int = 0
    mover: str = ""
    peer: str = ""
    old: dict[str, str] = field(default_factory=dict)
    new: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Trial:
        if not isinstance(data, dict):
            raise ValueError(f"trial is not a JSON object: {data!r:.80}")
        for name, kind in (("scenario", str), ("method", str), ("trial", int), ("ok", bool)):
            if not isinstance(data.get(name), kind):
                raise ValueError(f"trial field {name!r} missing or not {kind.__name__}")
        for name in ("error",):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"trial field {name!r} is not a string")
        for name in ("family", "session", "mover", "peer"):
            if name in data and not isinstance(data[name], str):
                raise ValueError(f"trial field {name!r} is {data[name]!r:.40}, not a string")
        for name in ("t_start_ns", "t_trigger_ns", "t_end_ns"):
            value = data.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"trial field {name!r} is {value!r:.40}, not an int")
        for name in ("old", "new"):
            if name in data:
                _check_mapping(name, data[name], _TERMINAL_RE)
        if "addresses" in data:
            _check_mapping("addresses", data["addresses"])
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        trial = cls(**known)
        if trial.ok:
            if not _scenario_known(trial.scenario):
                raise ValueError(f"ok trial {trial.name}: unknown scenario {trial.scenario!r} "
                                 f"(known: {', '.join(SCENARIO_ORDER)})")
            if trial.method not in METHOD_ORDER:
                raise ValueError(f"ok trial {trial.name}: unknown method {trial.method!r} "
                                 f"(known: {', '.join(METHOD_ORDER)})")
            for name in ("t_start_ns", "t_trigger_ns", "t_end_ns"):
                if not getattr(trial, name):
                    raise ValueError(f"ok trial {trial.name}: {name} missing or not an int")
            if not trial.t_start_ns <= trial.t_trigger_ns <= trial.t_end_ns:
                raise ValueError(f"ok trial {trial.name}: times out of order (t_start_ns "
                                 "<= t_trigger_ns <= t_end_ns does not hold)")
            if not trial.session or not trial.mover or not trial.old:
                raise ValueError(f"ok trial {trial.name}: session, mover and old are required")
            missing = set(trial.new) - set(trial.old)
            if missing:
                raise ValueError(f"ok trial {trial.name}: new names sides {sorted(missing)} "
                                 "that old does not")
        return trial

    @property
    def name(self) -> str:
        return f"{self.scenario}/{self.method}#{self.trial}"

    def addrs(self, terminal: str) -> set[str]:
        """The terminal's addresses ('a1' and 'a1_new', ...)."""
        return {v for k, v in self.addresses.items()
                if k == terminal or k.startswith(terminal + "_")}

    def sides(self) -> dict[str, list[str]]:
        """'a'/'b' -> that user's terminals in the trial, old first."""
        return {s: list(dict.fromkeys([self.old[s], self.new.get(s, self.old[s])]))
                for s in self.old}

    def terminals(self) -> set[str]:
        return {t for terms in self.sides().values() for t in terms}


def load_trials(run_dir: Path) -> tuple[list[Trial], list[str]]:
    """trials.jsonl -> trials, and the lines that could not be read (with why)."""
    path = run_dir / "trials.jsonl"
    trials: list[Trial] = []
    bad: list[str] = []
    if not path.exists():
        return trials, [f"{path} does not exist"]
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        return trials, [f"trials.jsonl cannot be read: {exc.strerror or exc}"]
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            try:
                line = raw.decode()
            except UnicodeDecodeError as exc:
                raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
            record = json.loads(line)
            if isinstance(record, dict) and record.pop("interrupted", False):
                bad.append(f"{record.get('scenario')}/{record.get('method')}"
                           f"#{record.get('trial')}: interrupted"
                           f" ({record.get('signal') or 'Ctrl-C'}), not counted")
                continue
            trials.append(Trial.from_json(record))
        except (ValueError, TypeError) as exc:
            bad.append(f"trials.jsonl line {n}: {exc}")
    if not trials and not bad:
        bad.append("no trials in trials.jsonl (it is empty): nothing to analyse")
    return trials, bad

