"""The runners' options, config files and stops: a bad option or config file is one clear line
before any lab boots; a stopped or refused run says what it left and how to finish it."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from experiments import experiment, lab, runner
from experiments.lab import Lab, LabError, MachineLock


def _error_of(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# -- 1. run names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../tmp/x", "", "a" * 300, ".hidden", "a/b", "a b"])
def test_bad_run_names_are_refused_by_the_cli_and_the_lab(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error_of(experiment.main, ["--trials", "1", "--name", name], capsys)
    assert "argument --name: run name " in err
    assert "expected 1 to 64 characters of A-Z a-z 0-9 . _ -, not starting with '.'" in err
    assert len(err) < 300
    with pytest.raises(LabError, match="expected 1 to 64 characters"):
        Lab(name=name)
    with pytest.raises(LabError, match="expected 1 to 64 characters"):
        lab.new_run_dir(name)


@pytest.mark.parametrize("name", ["experiment", "a", "my.run_2-b", "x" * 64])
def test_good_run_names(name: str, tmp_path: Path) -> None:
    assert lab.run_name_problem(name) is None
    run = lab.new_run_dir(name, tmp_path)
    assert run.parent == tmp_path and run.name.endswith(f"-{name}")
    assert sorted(p.name for p in run.iterdir()) == ["events", "logs", "pcaps"]


def test_stop_is_safe_when_the_run_folder_was_never_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    the_lab = Lab(name="never-made")
    the_lab._lock = MachineLock(tmp_path / "lock")
    the_lab._lock.acquire("test")  # start() failed after taking the lock, before the folder
    the_lab.stop()
    assert "lab is down" in capsys.readouterr().out
    assert not the_lab._lock.held


# -- 7. a refused lab removes the run folder it made -------------------------------------------
class _Caps:
    def summary(self) -> str:
        return "capabilities: test"

    def to_dict(self) -> dict[str, Any]:
        return {"test": True}


def test_a_refused_lab_removes_its_run_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(lab, "PROJECT", tmp_path)
    monkeypatch.setattr(lab, "CAPTURES", tmp_path / "captures")
    monkeypatch.setattr(lab, "probe", _Caps)
    monkeypatch.setattr(lab, "stale_runs", list)
    monkeypatch.setattr(lab, "ovs_bridges", lambda check=False: {"wlan", "other"})
    refused = Lab(name="refused")
    refused._lock = MachineLock(tmp_path / "lock")
    with pytest.raises(LabError, match=r"OVS bridge\(s\) wlan already exist"):
        refused.__enter__()
    assert refused.run_dir is not None and not refused.run_dir.exists()
    assert list((tmp_path / "captures").iterdir()) == []
    out = capsys.readouterr().out
    assert f"removed the run folder {refused.run_dir.name} (the lab did not start)" in out
    assert not refused._lock.held


def test_a_given_run_folder_is_kept_when_the_lab_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "PROJECT", tmp_path)
    monkeypatch.setattr(lab, "probe", _Caps)
    monkeypatch.setattr(lab, "stale_runs", list)
    monkeypatch.setattr(lab, "ovs_bridges", lambda check=False: {"lte"})
    run = tmp_path / "mine"
    run.mkdir()
    refused = Lab(name="given", run_dir=run)
    refused._lock = MachineLock(tmp_path / "lock")
    with pytest.raises(LabError, match="lte"):
        refused.__enter__()
    assert run.is_dir()  # not made by the lab: not the lab's to remove


# -- 2. config files checked before the lab boots ---------------------------------------------
def _configs(tmp_path: Path) -> dict[str, Path]:
    root = Path(__file__).resolve().parents[2] / "config"
    out = {}
    for name in ("lab", "credentials", "trust"):
        out[name] = tmp_path / f"{name}.json"
        out[name].write_text((root / f"{name}.json").read_text())
    return out


def _problem(files: dict[str, Path]) -> str | None:
    return lab.config_problem(files["lab"], files["credentials"], files["trust"])


@pytest.mark.parametrize(("file", "text", "error"), [
    ("credentials", "{garbled", "credentials.json: not valid JSON"),
    ("credentials", None, "credentials.json: PSK of 'a1' must be 16 to 64 bytes of hex"),
    ("credentials", '{"a1": "00112233445566778899aabbccddeeff"}',
     "credentials.json: no PSK for 'a2'"),
    ("trust", '{"key": "nothex"}', 'trust.json: expected {"key": "<hex>"}'),
    ("trust", "[]", 'trust.json: expected {"key": "<hex>"}'),
    ("trust", '{"key": "0011"}', "trust.json: the trust key must be at least 16 bytes"),
    ("lab", "[]", "lab.json: top level must be a JSON object"),
])
def test_config_problems_are_the_loaders_messages(
        tmp_path: Path, file: str, text: str | None, error: str) -> None:
    files = _configs(tmp_path)
    assert _problem(files) is None
    if text is None:  # a1's PSK not hex
        creds = json.loads(files["credentials"].read_text())
        creds["a1"] = "zz" * 16
        text = json.dumps(creds)
    files[file].write_text(text)
    problem = _problem(files)
    assert problem is not None and error in problem and "\n" not in problem


def test_a_missing_config_file(tmp_path: Path) -> None:
    files = _configs(tmp_path)
    files["trust"].unlink()
    assert _problem(files) == f"{files['trust']}: no such file"


@pytest.mark.parametrize(("main", "argv"), [(experiment.main, ["--trials", "1"]),
                                            (runner.main, ["lab"])])
def test_a_bad_config_stops_the_runners_before_the_lab(
        main: Any, argv: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for module in (experiment, runner):
        monkeypatch.setattr(module, "config_problem", lambda: "config/trust.json: no such file")
        monkeypatch.setattr(module, "guard", lambda: pytest.fail("got as far as the lab"))
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: config/trust.json: no such file\n"


def test_a_node_that_exits_at_start_is_its_logs_last_line(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    log.write_text("starting\nproxy: config/credentials.json: PSK of 'a1' must be 16 to 64 "
                   "bytes of hex\n\n")
    assert lab.last_log_line(log) == ("proxy: config/credentials.json: PSK of 'a1' must be "
                                      "16 to 64 bytes of hex")
    log.write_text("")
    assert lab.last_log_line(log) is None
    assert lab.last_log_line(tmp_path / "none.log") is None


# -- 3. runner probe options -------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "error"), [
    (["--fault", "zzz:wlan-a1:down@0:1"],
     "fault 'zzz:wlan-a1:down@0:1': no switch 'zzz'; switches: core, wlan, lte, netb"),
    (["--fault", "wlan:nope:down@0:1"],
     "fault 'wlan:nope:down@0:1': no port 'nope' on wlan; its ports: wlan-r0, wlan-a1, wlan-a2"),
    (["--fault", "wlan:lte-a1:down@0:1"], "no port 'lte-a1' on wlan"),
    (["--fault", "wlan:wlan-a1:zap@0:1"], "kind must be down or blackhole"),
    (["--fault", "wlan:wlan-a1:down@inf"], "times must be finite seconds"),
    (["--seconds", "inf"], "argument --seconds: expected seconds greater than 0 and at most 3600"),
    (["--seconds", "-1"], "argument --seconds: expected seconds greater than 0"),
    (["--seconds", "0"], "argument --seconds: expected seconds greater than 0"),
    (["--seconds", "nan"], "argument --seconds: expected seconds greater than 0"),
    (["--seconds", "x"], "argument --seconds: expected seconds, got 'x'"),
    (["--rate", "0"], "argument --rate: expected packets/s greater than 0 and at most 1000"),
    (["--rate", "-5"], "argument --rate: expected packets/s greater than 0"),
    (["--rate", "1e9"], "argument --rate: expected packets/s greater than 0 and at most 1000"),
    (["--seconds", "2", "--fault", "wlan:wlan-a1:down@1:3"],
     "fault(s) after the end of the run (--seconds 2): wlan:wlan-a1@1"),
])
def test_bad_probe_options(argv: list[str], error: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert error in _error_of(runner.main, ["probe", *argv], capsys)


def test_probe_help_says_the_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        runner.main(["probe", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0 < S <= 3600" in out and "0 < R <= 1000" in out


def test_every_topology_port_is_a_fault_target() -> None:
    plan = runner.FaultPlan.parse("lte:lte-a1:blackhole@1.5:2")
    assert (plan.switch, plan.port, plan.kind, plan.start, plan.end) == (
        "lte", "lte-a1", "blackhole", 1.5, 2.0)
    ports = runner.switch_ports()
    assert ports["netb"] == ["netb-r0", "netb-b1", "netb-b2"]
    assert ports["core"] == ["core-r0", "core-proxy", "core-sms", "core-presence"]


# -- 4. scenarios and the sweep ----------------------------------------------------------------
@pytest.mark.parametrize(("argv", "error"), [
    (["--scenario", "link-planned,link-planned"],
     "scenario(s) given twice: link-planned (each runs once per round; use --trials for more)"),
    (["--scenario", "all,link-planned"],
     "'all' cannot be combined with other scenarios (got 'all,link-planned')"),
    (["--scenario", "all,all"], "'all' cannot be combined"),
    (["--sweep-trials", "-1"], "argument --sweep-trials: must be 0..20, got -1"),
    (["--sweep-trials", "100000000"], "argument --sweep-trials: must be 0..20, got 100000000"),
    (["--sweep-trials", "x"], "argument --sweep-trials: expected a whole number, got 'x'"),
])
def test_bad_scenarios_and_sweeps(argv: list[str], error: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert error in _error_of(experiment.main, argv, capsys)


def test_good_scenarios() -> None:
    assert experiment.parse_scenarios("all") == list(experiment.SCENARIOS)
    assert experiment.parse_scenarios(" link-blackhole , terminal-switch ") == [
        "link-blackhole", "terminal-switch"]


# -- 5. stops: the signal's name, and how to finish an analysis that did not run -----------------
def test_the_stop_signal_is_named() -> None:
    from experiments.console import _interrupt, stop_signal

    assert stop_signal(KeyboardInterrupt()) == "SIGINT"
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(KeyboardInterrupt) as exc:
            _interrupt(sig, None)
        assert stop_signal(exc.value) == sig.name


def test_the_runner_names_the_signal_that_stopped_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def stopped(_: Any) -> int:
        raise KeyboardInterrupt("signal SIGHUP")

    monkeypatch.setattr(runner, "guard", lambda: None)
    monkeypatch.setattr(runner, "run_probe", stopped)
    assert runner.main(["probe"]) == 130
    assert capsys.readouterr().err == "interrupted by SIGHUP: the lab was torn down\n"


class _FakeLab:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.nodes: dict[str, Any] = {}
        self.faults = None


def test_an_interrupted_trial_is_recorded_with_its_signal_even_if_its_cleanup_is_cut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trials = experiment.Runner(_FakeLab(tmp_path), print)  # type: ignore[arg-type]

    def stopped(*_: Any) -> None:
        raise KeyboardInterrupt("signal SIGTERM")

    def second_signal(*_: Any) -> None:
        raise KeyboardInterrupt()

    monkeypatch.setattr(trials, "_link_trial", stopped)
    monkeypatch.setattr(trials, "_cleanup", second_signal)
    with pytest.raises(KeyboardInterrupt):
        trials.run(experiment.Plan("link-planned", "proposed", 1))
    (record,) = [json.loads(line) for line in (tmp_path / "trials.jsonl").open()]
    assert record["interrupted"] is True and record["signal"] == "SIGTERM"
    assert record["error"] == "interrupted by SIGTERM"


def _stopped_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException,
                 trials: bool = True) -> Path:
    run = tmp_path / "20260101-000000-experiment"
    run.mkdir()
    if trials:
        (run / "trials.jsonl").write_text('{"scenario": "link-planned"}\n')

    def fake_run(*args: Any) -> Path:
        args[-1].run_dir = run
        raise exc

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    monkeypatch.setattr(experiment, "config_problem", lambda: None)
    monkeypatch.setattr(experiment, "guard", lambda: None)
    return run


@pytest.mark.parametrize(("exc", "code"), [(KeyboardInterrupt(), 130),
                                           (LabError("a node died"), 1)])
def test_a_run_whose_analysis_did_not_run_says_how_to_run_it(
        exc: BaseException, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = _stopped_run(tmp_path, monkeypatch, exc)
    assert experiment.main(["--trials", "1"]) == code
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"analysis not done: run .venv/bin/python -m "
                                    f"experiments.analysis {run}")


def test_no_hint_without_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _stopped_run(tmp_path, monkeypatch, KeyboardInterrupt(), trials=False)
    assert experiment.main(["--trials", "1"]) == 130
    assert "analysis not done" not in capsys.readouterr().err


def test_a_failed_analysis_is_reported_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from experiments import analysis

    def broken(*_: Any) -> None:
        raise ValueError("bad pcap")

    monkeypatch.setattr(analysis, "analyze", broken)
    assert experiment.report(tmp_path) is False
    assert capsys.readouterr().err == "analysis failed: bad pcap\n"


def test_the_analysis_command_is_relative_to_the_project() -> None:
    run = lab.CAPTURES / "20260101-000000-x"
    assert lab.analysis_command(run) == (".venv/bin/python -m experiments.analysis "
                                         "captures/20260101-000000-x")


def test_a_killed_runs_clean_up_says_its_trials_can_be_analysed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "ovs_bridges", lambda check=False: set())
    run = tmp_path / "20260101-000000-killed"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stopped": False, "bridges": ["wlan"],
                                                   "links": []}))
    said: list[str] = []
    lab.clean_stale_run(run, said.append)
    assert said == [f"removed what the killed run {run.name} left: nothing"]
    (run / "trials.jsonl").write_text('{"scenario": "link-planned"}\n')
    said.clear()
    lab.clean_stale_run(run, said.append)
    assert said == [f"removed what the killed run {run.name} left: nothing; its finished "
                    f"trials can be analysed: .venv/bin/python -m experiments.analysis {run}"]


# -- 6. help texts ----------------------------------------------------------------------------
def _help(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_the_experiment_help_is_the_whole_description(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    out = _help(experiment.main, [], capsys)
    assert "N trials each, on\nreal traffic in one lab; then the analysis" in out
    assert "terminal-switch     Fig 3: A1–B1 voice becomes A2–B2 video" in out
    flat = " ".join(out.split())
    assert "1 to 64 characters" in flat and "0..20" in flat


def test_the_decrypt_help_says_where_the_rest_goes(capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.decrypt import main as decrypt

    out = _help(decrypt, [], capsys)
    assert "esp_sa rows become tshark\noptions, the rest of the command line goes to tshark" in out
    assert "[TSHARK_ARG ...]" in out
    assert "goes to tshark as it is." in " ".join(out.split()[-20:])


def test_control_without_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.control import main as control

    err = _error_of(control, ["/nonexistent.sock"], capsys)
    assert err.endswith("error: the following argument is required: cmd (e.g. status; help "
                        "lists the node's commands)")
    assert "params" not in err


@pytest.mark.parametrize(("module", "first_line"), [
    ("nodes.sms", "Session management server (SMS): terminal and media switch, Fig 3"),
    ("nodes.presence", "Presence server: knows each user's terminals, their capabilities"),
])
def test_the_servers_help_says_what_they_are(module: str, first_line: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert f"\n\n{first_line}" in out
    assert f"python -m {module} --config config/lab.json" in out  # its usage example


def test_a_parser_that_names_its_description_keeps_it() -> None:
    import argparse

    from nodes.cli import node_arguments

    parser = argparse.ArgumentParser(prog="python -m nodes.sms", description="mine")
    node_arguments(parser)
    assert parser.description == "mine"
    parser = argparse.ArgumentParser(prog="python -m no.such.module")
    node_arguments(parser)
    assert parser.description is None
