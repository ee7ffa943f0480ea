"""The handover experiments (`make experiment`): every scenario × method, N trials each, on
real traffic in one lab; then the analysis (tables, plots, ladder diagrams, claims check).

Scenarios (SCENARIO=...):
  link-planned        Fig 4 switch wlan → lte while wlan still works (make before break)
  link-carrier-loss   the controller takes A1's wlan port down; A1 sees carrier loss
  link-blackhole      the controller drops A1's wlan traffic silently; media timeout
  terminal-switch     Fig 3: A1–B1 voice becomes A2–B2 video
Methods: link × {proposed, register-then-switch, reinvite}; terminal × {reuse, renegotiate}.

    python -m experiments.experiment [--trials 5] [--scenario all|NAME[,NAME]]

Each trial is one call: set up, media flowing, the trigger, the switch, media on the new
path, hang up. Its record goes to captures/<run>/trials.jsonl as soon as it ends, so Ctrl-C
(or SIGTERM, SIGHUP) keeps every finished trial, and the analysis still runs on them; when
it cannot run or finish, the run prints the command that does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.console import guard, stop_signal
from experiments.control import NodeControl, NodeError
from experiments.lab import (
    Lab,
    LabError,
    analysis_command,
    config_problem,
    run_name_problem,
    wait_until,
)
from nodes.mediasend import VoiceSender
from topologies.m2m import address

SCENARIOS: dict[str, tuple[str, str | None]] = {  # name -> (family, fault kind)
    "link-planned": ("link", None),
    "link-carrier-loss": ("link", "down"),
    "link-blackhole": ("link", "blackhole"),
    "terminal-switch": ("terminal", None),
}
METHODS = {"link": ("proposed", "register-then-switch", "reinvite"),
           "terminal": ("reuse", "renegotiate")}
PRE_S, POST_S = 0.6, 1.2  # media before the trigger and after the switch, per trial
SWEEP_RTTS_MS = (0, 20, 50, 100)  # access-network round-trip times for the delay sweep
SWEEP_METHODS = ("proposed", "register-then-switch")
MEDIA_TIMEOUT = 0.3
MAX_TRIALS, MAX_SWEEP_TRIALS = 100, 20


@dataclass
class Outcome:
    """How far a run got: its folder once the lab is up, and whether the analysis finished
    (main() says how to run it when it did not)."""

    run_dir: Path | None = None
    analysed: bool = False


@dataclass(frozen=True)
class Plan:
    scenario: str
    method: str
    trial: int


def plans(scenarios: list[str], trials: int, seed: int = 0) -> list[Plan]:
    """Trials interleaved (every scenario × method once, then again): slow drifts of the
    machine then spread over all methods instead of biasing one. Within each round the
    methods of a scenario run in a shuffled order (seeded: a run can be repeated), so that
    no method always runs first, right after another scenario's clean-up."""
    rng = random.Random(seed)
    out = []
    for t in range(1, trials + 1):
        for s in scenarios:
            methods = list(METHODS[SCENARIOS[s][0]])
            rng.shuffle(methods)
            out += [Plan(s, m, t) for m in methods]
    return out


class Runner:
    def __init__(self, lab: Lab, say: Callable[[str], None], seed: int = 0) -> None:
        self.lab = lab
        self.say = say
        self.rng = random.Random(seed)
        assert lab.run_dir is not None
        self.trials_path = lab.run_dir / "trials.jsonl"

    def node(self, name: str) -> NodeControl:
        return self.lab.nodes[name]

    def setup(self, terminals: list[str]) -> None:
        self.lab.start_servers()
        for name in terminals:
            self.lab.start_terminal(name, media_timeout=MEDIA_TIMEOUT)
            self.node(name)("register")

    # -- one trial ------------------------------------------------------------------------------
    def run(self, plan: Plan) -> dict[str, Any]:
        rtt = _rtt_of(plan.scenario)
        family, fault = SCENARIOS[plan.scenario.partition("-rtt")[0]]
        record: dict[str, Any] = {"scenario": plan.scenario, "family": family,
                                  "method": plan.method, "trial": plan.trial,
                                  "t_start_ns": time.time_ns(), "ok": False, "error": None}
        if rtt is not None:
            record["rtt_ms"] = rtt
        try:
            if family == "link":
                self._link_trial(plan.method, fault, record)
            else:
                self._terminal_trial(plan.method, record)
            record["ok"] = True
        except (NodeError, TimeoutError, OSError, RuntimeError) as exc:
            record["error"] = str(exc)
        except KeyboardInterrupt as exc:
            record["signal"] = stop_signal(exc)
            record["error"] = f"interrupted by {record['signal']}"
            record["interrupted"] = True
            raise
        finally:
            record.setdefault("t_end_ns", time.time_ns())
            try:  # the record is kept even if a second signal cuts the clean-up short
                self._cleanup(record)
            finally:
                with self.trials_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        return record

    def _call(self, record: dict[str, Any]) -> str:
        cid = self.node("a1")("call", to="b1")["call_id"]
        record["session"] = cid
        wait_until(lambda: cid in self.node("sms")("status")["sessions"], 10, "the SMS")
        wait_until(lambda: self._rx("b1", cid) > 10 and self._rx("a1", cid) > 10, 10,
                   "media both ways")
        # A switch ends at the first voice packet on the new path, one every 20 ms: the trigger
        # falls at a random phase of that clock, so that no method is lucky or unlucky by
        # how its procedure time lines up with it (the media start fixes the phase otherwise).
        jitter = self.rng.uniform(0.0, VoiceSender.frame_s)
        record["phase_jitter_ms"] = round(jitter * 1000, 3)
        time.sleep(PRE_S + jitter)
        return cid

    def _rx(self, name: str, cid: str) -> int:
        st = self.node(name)("status")
        media = st["calls"].get(cid, {}).get("media") or st["sessions"].get(cid)
        return media["rx"]["packets"] if media else 0

    def _link_trial(self, method: str, fault: str | None, record: dict[str, Any]) -> None:
        a1 = self.node("a1")
        a1("register", via="a1-wlan")
        a1("auto_switch", method=method if fault else "off")
        cid = self._call(record)
        record.update(mover="a1", peer="b1", old={"a": "a1", "b": "b1"},
                      new={"a": "a1", "b": "b1"},
                      addresses={"a1": address("a1", "wlan"), "a1_new": address("a1", "lte"),
                                 "b1": address("b1", "netb")})
        if fault is None:
            record["t_trigger_ns"] = time.time_ns()
            a1("link_switch", via="a1-lte", method=method)
        else:
            assert self.lab.faults is not None
            injected = self.lab.faults.inject("wlan", "wlan-a1", fault)
            record["fault_id"] = injected["id"]
            record["t_trigger_ns"] = injected["t_ns"]

        def moved() -> bool:
            media = a1("status")["calls"].get(cid, {}).get("media") or {}
            return str(media.get("local", "")).startswith(address("a1", "lte") + ":")

        wait_until(moved, 15, f"the {method} switch to lte")
        time.sleep(POST_S)
        record["t_end_ns"] = time.time_ns()

    def _terminal_trial(self, method: str, record: dict[str, Any]) -> None:
        # A known start: a1 on wlan (a link-switch trial before may have left it on lte).
        self.node("a1")("register", via="a1-wlan")
        cid = self._call(record)
        record.update(mover="a1", peer="b1", old={"a": "a1", "b": "b1"},
                      new={"a": "a2", "b": "b2"},
                      addresses={t: address(t, "wlan" if t[0] == "a" else "netb")
                                 for t in ("a1", "a2", "b1", "b2")})
        record["t_trigger_ns"] = time.time_ns()
        self.node("a1")("switch", call_id=cid, to="a2", media="video", method=method)
        if method == "reuse":  # the rekey (step 9) belongs to the trial
            wait_until(lambda: self._rekeyed(cid), 15, "the rekey")
        time.sleep(POST_S)
        record["t_end_ns"] = time.time_ns()

    def _rekeyed(self, cid: str) -> bool:
        assert self.lab.run_dir is not None
        path = self.lab.run_dir / "events" / "a2.jsonl"
        return any(e.get("step") == "rekeyed" and e.get("session") == cid
                   for e in _jsonl(path))

    def _cleanup(self, record: dict[str, Any]) -> None:
        """Back to a known state: faults restored, calls and sessions ended."""
        if self.lab.faults is not None:
            try:
                self.lab.faults.restore_all()
            except OSError as exc:
                self.say(f"warning: could not restore faults: {exc}")
        for name in ("a1", "b1", "a2", "b2"):
            if name not in self.lab.nodes:
                continue
            try:
                st = self.node(name)("status")
                for cid in st["calls"]:
                    self.node(name)("hangup", call_id=cid)
                for sid in st["sessions"]:
                    self.node(name)("end", session=sid)
            except (NodeError, OSError):
                pass
        if "a1" in self.lab.nodes:
            with contextlib.suppress(NodeError, OSError):
                self.node("a1")("auto_switch", method="off")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    from experiments.lab import read_jsonl

    return list(read_jsonl(path))


def _rtt_of(scenario: str) -> int | None:
    _, sep, rtt = scenario.partition("-rtt")
    return int(rtt) if sep else None


def run_experiment(scenarios: list[str], trials: int, name: str = "experiment",
                   sweep_trials: int = 1, seed: int | None = None,
                   outcome: Outcome | None = None) -> Path:
    outcome = outcome if outcome is not None else Outcome()
    seed = random.randrange(1 << 31) if seed is None else seed
    todo = plans(scenarios, trials, seed)
    families = {SCENARIOS[s][0] for s in scenarios}
    terminals = ["a1", "b1"] + (["a2", "b2"] if "terminal" in families else [])
    start = time.monotonic()
    interrupted: str | None = None
    current_rtt: int | None = None
    with Lab(name=name) as lab:
        assert lab.run_dir is not None
        outcome.run_dir = lab.run_dir
        runner = Runner(lab, lab.say, seed)
        runner.setup(terminals)
        (lab.run_dir / "plan.json").write_text(json.dumps(
            {"scenarios": scenarios, "trials": trials, "planned": len(todo), "seed": seed,
             "order": [f"{p.scenario}/{p.method}#{p.trial}" for p in todo]}, indent=2))
        sweep: list[Plan] = []
        if lab.caps is not None and lab.caps.netem and sweep_trials:
            sweep = [Plan(f"link-planned-rtt{rtt}", m, t) for rtt in SWEEP_RTTS_MS
                     for t in range(1, sweep_trials + 1) for m in SWEEP_METHODS]
        else:
            why = "kernel has no netem" if sweep_trials else "not asked for (--sweep-trials 0)"
            lab.say(f"delay sweep skipped: {why}")
            (lab.run_dir / "sweep.json").write_text(json.dumps({"skipped": why}) + "\n")
        todo = todo + sweep
        start = time.monotonic()  # the ETA counts trials, not the lab's start-up
        try:
            for i, plan in enumerate(todo, 1):
                rtt = _rtt_of(plan.scenario)
                if rtt is not None and rtt != current_rtt:
                    lab.set_access_delay(rtt)
                    current_rtt = rtt
                t0 = time.monotonic()
                rec = runner.run(plan)
                elapsed = time.monotonic() - start
                eta = (time.monotonic() - start) / i * (len(todo) - i)
                status = "ok" if rec["ok"] else f"FAILED: {rec['error']}"
                lab.say(f"trial {i}/{len(todo)} {plan.scenario} / {plan.method} "
                        f"#{plan.trial}: {status} ({time.monotonic() - t0:.1f} s; "
                        f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s)")
        except KeyboardInterrupt as exc:
            interrupted = stop_signal(exc)
            lab.say(f"interrupted by {interrupted}: keeping the finished trials")
        run_dir = lab.run_dir
    outcome.analysed = report(run_dir)
    if interrupted:
        raise KeyboardInterrupt(f"signal {interrupted}")
    return run_dir


def report(run_dir: Path) -> bool:
    """Analysis, plots and ladders (experiments.analysis), printed at the end; False if the
    analysis could not run (main() then says how to run it later)."""
    try:
        from experiments import analysis
    except ImportError as exc:  # analysis not installed: the raw trials are still there
        print(f"analysis unavailable ({exc}); trials are in {run_dir / 'trials.jsonl'}")
        return False
    try:
        results = analysis.analyze(run_dir)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"analysis failed: {exc}", file=sys.stderr)
        return False
    from experiments.ladder import draw_ladders
    from experiments.plots import draw_plots

    figures = [*draw_plots(run_dir, results), *draw_ladders(run_dir, results)]
    print(f"{len(figures)} figures in {run_dir / 'plots'}")
    md = run_dir / "results.md"
    emulation = (results.get("capabilities") or {}).get("emulation")
    if md.exists() and emulation:
        md.write_text(f"> **Timings taken under emulation ({emulation})**: compare the methods "
                      f"with each other, not with a real machine.\n\n" + md.read_text())
    if md.exists():
        print(md.read_text())
    print(f"results in {run_dir}")
    return True


def run_name(text: str) -> str:
    """--name: the run folder's suffix (argparse type)."""
    problem = run_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def sweep_trials(text: str) -> int:
    """--sweep-trials: 0..MAX_SWEEP_TRIALS (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SWEEP_TRIALS:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_SWEEP_TRIALS}, got {value}")
    return value


def parse_scenarios(text: str) -> list[str]:
    """`all` or a comma list of distinct scenario names; ValueError says what is wrong."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    known = f"known: all, {', '.join(SCENARIOS)}"
    if not names:
        raise ValueError(f"no scenario given; {known}")
    if names == ["all"]:
        return list(SCENARIOS)
    if "all" in names:
        raise ValueError(f"'all' cannot be combined with other scenarios (got {text!r})")
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; {known}")
    twice = sorted({s for s in names if names.count(s) > 1})
    if twice:
        raise ValueError(f"scenario(s) given twice: {', '.join(twice)} (each runs once per "
                         f"round; use --trials for more)")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.experiment",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5,
                        help=f"trials per scenario × method (1..{MAX_TRIALS})")
    parser.add_argument("--scenario", default="all",
                        help=f"all, or a comma list of distinct names: {', '.join(SCENARIOS)}")
    parser.add_argument("--name", type=run_name, default="experiment",
                        help="run folder suffix (captures/<stamp>-NAME): 1 to 64 characters "
                             "of A-Z a-z 0-9 . _ -, not starting with '.'")
    parser.add_argument("--seed", type=int, help="seed of the method order in each round "
                                                 "(default: a new one, kept in plan.json)")
    parser.add_argument("--sweep-trials", type=sweep_trials, default=1,
                        help=f"trials per RTT of the delay sweep, 0..{MAX_SWEEP_TRIALS} "
                             f"(needs netem; 0: no sweep)")
    args = parser.parse_args(argv)
    if not 1 <= args.trials <= MAX_TRIALS:
        parser.error(f"--trials must be 1..{MAX_TRIALS}, got {args.trials}")
    try:
        scenarios = parse_scenarios(args.scenario)
    except ValueError as exc:
        parser.error(str(exc))
    preflight = config_problem()
    if preflight:
        print(f"error: {preflight}", file=sys.stderr)
        return 2
    guard()
    outcome = Outcome()
    code = 0
    try:
        run_experiment(scenarios, args.trials, args.name, args.sweep_trials, args.seed,
                       outcome)
    except KeyboardInterrupt:
        code = 130
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    run_dir = outcome.run_dir
    if run_dir is not None and not outcome.analysed and (run_dir / "trials.jsonl").exists():
        print(f"analysis not done: run {analysis_command(run_dir)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
