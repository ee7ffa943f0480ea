"""A lab leaves nothing behind: after a normal run, an exception mid-run, SIGINT, SIGTERM,
SIGHUP (a closed terminal), Ctrl-C after its output pipe died (`| tee`), and even SIGKILL
(its processes die with it; the next lab removes its bridges)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from experiments.lab import PROJECT, Lab, LabError, python, wait_until
from tests.lab.leftovers import new_since, snapshot

pytestmark = pytest.mark.lab


def test_normal_run_leaves_nothing() -> None:
    before = snapshot()
    with Lab(name="test-normal", capture=True) as lab:
        lab.start_probe()
        assert len(lab.net.hosts) == 8
    assert new_since(before) == {}


def test_exception_mid_run_leaves_nothing() -> None:
    before = snapshot()
    with pytest.raises(RuntimeError, match="boom"), Lab(name="test-raise") as lab:
        lab.start_probe()
        raise RuntimeError("boom")
    assert new_since(before) == {}


def start_runner() -> tuple[subprocess.Popen[str], list[str]]:
    """`runner probe` for two minutes, once its lab is up (and its probes started)."""
    runner = subprocess.Popen(
        [python(), "-m", "experiments.runner", "probe", "--seconds", "120"],
        cwd=PROJECT, env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    assert runner.stdout is not None
    deadline = time.monotonic() + 60
    for line in runner.stdout:
        lines.append(line)
        if "lab is up" in line or time.monotonic() > deadline:
            break
    assert any("lab is up" in line for line in lines), "".join(lines)
    time.sleep(1)  # let the probe processes start
    return runner, lines


def run_folder(lines: list[str]) -> Path:
    first = next(line for line in lines if "run folder" in line)
    return PROJECT / first.split("run folder ")[1].strip()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_to_runner_leaves_nothing(sig: signal.Signals) -> None:
    before = snapshot()
    runner, lines = start_runner()
    try:
        runner.send_signal(sig)
        out, _ = runner.communicate(timeout=60)
        lines.append(out)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 130, "".join(lines)
    assert "lab is down" in "".join(lines)
    wait_until(lambda: new_since(before) == {}, 5, "everything to be gone")


def test_ctrl_c_after_the_output_pipe_died_leaves_nothing() -> None:
    """`make experiment | tee log` and Ctrl-C: tee dies first; the teardown must not die on
    its first print."""
    before = snapshot()
    runner, lines = start_runner()
    try:
        assert runner.stdout is not None
        runner.stdout.close()
        runner.send_signal(signal.SIGINT)
        assert runner.wait(60) == 130
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert json.loads((run_folder(lines) / "manifest.json").read_text())["stopped"] is True
    wait_until(lambda: new_since(before) == {}, 5, "everything to be gone")


def test_sigkill_leaves_only_bridges_and_the_next_lab_removes_them() -> None:
    before = snapshot()
    runner, lines = start_runner()
    runner.kill()
    runner.wait()
    # Its processes die with it (PR_SET_PDEATHSIG), and with them its hosts and links; the
    # bridges stay (OVS keeps them: their own devices, and its datapath's `ovs-netdev`).
    def only_bridges_left() -> bool:
        left = new_since(before)
        return set(left) <= {"bridges", "links"} and \
            left.get("links", set()) <= left.get("bridges", set()) | {"ovs-netdev"}

    wait_until(only_bridges_left, 10, "its processes and links to go")
    assert new_since(before)["bridges"] == {"core", "lte", "netb", "wlan"}
    killed = run_folder(lines)
    with Lab(name="test-after-kill", capture=False):
        pass
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["stopped"] is True and manifest["cleaned_up_after_its_death"] is True
    assert new_since(before) == {}


def test_a_second_lab_is_refused_and_the_first_keeps_running(
        capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot()
    with Lab(name="test-first", capture=False) as first:
        capsys.readouterr()
        with pytest.raises(LabError, match="another smig-lab lab is running"):
            Lab(name="test-second", capture=False).__enter__()
        assert "lab is down" not in capsys.readouterr().out  # the first one is not
        assert {"core", "lte", "netb", "wlan"} <= snapshot()["bridges"]
        assert first.faults is not None and len(first.faults.switches()) == 4
    assert new_since(before) == {}
