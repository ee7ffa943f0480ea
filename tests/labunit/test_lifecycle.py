"""Pure tests of the lab's life-cycle pieces: the machine lock, killed-run detection, and the
runners' console that survives a vanished terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.console import _Tolerant
from experiments.lab import LabError, MachineLock, stale_runs


def test_one_lab_per_machine(tmp_path: Path) -> None:
    first, second = MachineLock(tmp_path / "lock"), MachineLock(tmp_path / "lock")
    first.acquire("lab 'a' in /x")
    with pytest.raises(LabError, match=rf"another smig-lab lab is running on this machine "
                                       rf"\(pid {os.getpid()}, lab 'a' in /x\)"):
        second.acquire("lab 'b'")
    first.release()
    second.acquire("lab 'b'")
    second.release()


def test_the_lock_goes_with_its_process_however_it_dies(tmp_path: Path) -> None:
    code = ("import sys, time; sys.path.insert(0, sys.argv[2])\n"
            "from pathlib import Path\n"
            "from experiments.lab import MachineLock\n"
            "MachineLock(Path(sys.argv[1])).acquire('child'); print('held', flush=True)\n"
            "time.sleep(60)\n")
    root = str(Path(__file__).resolve().parents[2])
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "lock"), root],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with pytest.raises(LabError, match="child"):
            MachineLock(tmp_path / "lock").acquire("me")
        child.kill()
        child.wait(10)
        lock = MachineLock(tmp_path / "lock")
        lock.acquire("me")  # SIGKILL released it
        lock.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _manifest(run: Path, stopped: bool, pid: int, started: object) -> None:
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(
        {"stopped": stopped, "runner": {"pid": pid, "started": started}, "bridges": ["wlan"]}))


def test_stale_runs_are_unstopped_runs_whose_runner_is_gone(tmp_path: Path) -> None:
    me = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
    _manifest(tmp_path / "alive", False, os.getpid(), me)
    _manifest(tmp_path / "stopped", True, 1 << 22, 1)
    _manifest(tmp_path / "killed", False, 1 << 22, 1)  # no such pid
    _manifest(tmp_path / "reused", False, os.getpid(), me + 1)  # our pid, not our start time
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "manifest.json").write_text("{not json")
    assert [p.name for p in stale_runs(tmp_path)] == ["killed", "reused"]


class _Gone:
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise OSError(5, "Input/output error")


def test_console_goes_quiet_when_its_terminal_is_gone() -> None:
    out = _Tolerant(_Gone())  # type: ignore[arg-type]
    assert out.write("lab is down\n") == len("lab is down\n")
    out.flush()
    assert out.gone
    print("more", file=out)  # type: ignore[arg-type]
