"""A lab leaves nothing behind: after a normal run, an exception mid-run, and SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from experiments.lab import PROJECT, Lab, python, wait_until
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_runner_leaves_nothing(sig: signal.Signals) -> None:
    before = snapshot()
    runner = subprocess.Popen(
        [python(), "-m", "experiments.runner", "probe", "--seconds", "120"],
        cwd=PROJECT, env=dict(os.environ, PYTHONPATH=str(PROJECT)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert runner.stdout is not None
        deadline = time.monotonic() + 60
        for line in runner.stdout:
            lines.append(line)
            if "lab is up" in line or time.monotonic() > deadline:
                break
        assert any("lab is up" in line for line in lines), "".join(lines)
        time.sleep(1)  # let the probe processes start
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
