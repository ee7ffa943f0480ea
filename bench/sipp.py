"""Running SIPp and the proxy as processes on loopback, for the interop tests and `make bench`.

* `bench_config()` writes a lab config with N terminals `t0000..` (one user, so any of them
  may call any other) for the proxy's known-AOR rule.
* `run_sipp()` runs a SIPp client scenario to completion and returns its final statistics
  (parsed from SIPp's `-trace_stat` CSV); `start_sipp()` starts a SIPp server in the
  background.
* `ProxyProcess` runs `python -m nodes.proxy --mode open` with a control socket.

Every process started here is stopped by the caller's `finally` (`stop()`/`stop_process()`);
everything written goes to a caller-given directory.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.control import NodeControl

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "bench" / "scenarios"
DOMAIN = "m2m.example"
SERVERS = {"proxy": "10.0.0.10", "sms": "10.0.0.11", "presence": "10.0.0.12"}


def free_port(host: str) -> int:
    """An ephemeral UDP port free on `host` right now (SIPp and the proxy bind it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def terminal_names(n: int) -> list[str]:
    return [f"t{i:04d}" for i in range(n)]


def bench_config(path: Path, n: int, extra: Sequence[str] = ()) -> list[str]:
    """Writes a config with terminals t0000..t{n-1} (+ `extra`) in one user; returns names."""
    names = [*terminal_names(n), *extra]
    data = {"domain": DOMAIN,
            "users": {"bench": {"terminals": {t: ["audio"] for t in names}}},
            "friends": [], "servers": SERVERS}
    path.write_text(json.dumps(data))
    return names


def write_inf(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    """A SIPp injection file read in sequence (one row per call, wrapping around)."""
    path.write_text("SEQUENTIAL\n" + "".join(";".join(r) + "\n" for r in rows))
    return path


@dataclass
class SippResult:
    """SIPp's cumulative statistics at the end of a run, and its exit code."""

    exit_code: int
    successful: int
    failed: int
    retransmissions: int
    elapsed_s: float
    rate: float  # successful calls per second over the run, as SIPp measured it
    stats: dict[str, str]
    output: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.failed == 0


def _epoch(stamp: str) -> float:
    """SIPp's time stamps are 'date<TAB>time<TAB>epoch-seconds'."""
    return float(stamp.split("\t")[-1])


def parse_stats(path: Path) -> dict[str, str]:
    """The last row of a SIPp `-trace_stat` CSV as {column: value}."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if len(rows) < 2:
        raise ValueError(f"{path}: no statistics row")
    header, last = rows[0], rows[-1]
    return {k: v for k, v in zip(header, last, strict=False) if k}


def sipp_command(scenario: str | Path, remote: str | None, local_ip: str, local_port: int,
                 workdir: Path, *, inf: Path | None = None, count: int | None = None,
                 rate: float | None = None, users: int | None = None,
                 limit: int | None = None, timeout_s: float | None = None,
                 cpu: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    scen = Path(scenario)
    if not scen.is_absolute():
        scen = SCENARIOS / scen
    cmd = ["sipp", "-sf", str(scen), "-i", local_ip, "-p", str(local_port), "-bind_local",
           "-t", "u1", "-nostdin", "-cp", str(free_port("127.0.0.1")),
           "-trace_stat", "-stf", str(workdir / f"{scen.stem}-{local_port}.csv"), "-fd", "1",
           "-trace_err", "-error_file", str(workdir / f"{scen.stem}-{local_port}-errors.log"),
           "-max_recv_loops", "10000", "-max_sched_loops", "10000",
           # SIPp's own socket buffers default to 64 KiB: too small for a burst of replies.
           "-buff_size", str(4 * 1024 * 1024)]
    if inf is not None:
        cmd += ["-inf", str(inf)]
    if count is not None:
        cmd += ["-m", str(count)]
    if users is not None:
        cmd += ["-users", str(users)]
    elif rate is not None:
        cmd += ["-r", str(rate), "-rp", "1000"]
    if limit is not None:
        cmd += ["-l", str(limit)]
    if timeout_s is not None:
        cmd += ["-timeout", f"{timeout_s}s", "-timeout_error"]
    cmd += list(extra)
    if remote is not None:
        cmd.append(remote)
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return cmd


def run_sipp(scenario: str | Path, remote: str, local_ip: str, local_port: int,
             workdir: Path, *, wall_timeout: float = 120.0, **kw: Any) -> SippResult:
    """Runs a SIPp client scenario to its end (bounded by -m and -timeout) and reads its stats."""
    cmd = sipp_command(scenario, remote, local_ip, local_port, workdir, **kw)
    stat_file = Path(cmd[cmd.index("-stf") + 1])
    with contextlib.suppress(FileNotFoundError):
        stat_file.unlink()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=workdir)
    try:
        out, _ = proc.communicate(timeout=wall_timeout)
    finally:
        stop_process(proc)
    text = out.decode(errors="replace") if out else ""
    try:
        stats = parse_stats(stat_file)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"SIPp left no statistics ({exc}); exit {proc.returncode}; "
                           f"output:\n{text[-3000:]}") from None
    ok = int(stats.get("SuccessfulCall(C)", "0"))
    elapsed = _epoch(stats["CurrentTime"]) - _epoch(stats["StartTime"])
    return SippResult(
        exit_code=proc.returncode if proc.returncode is not None else -1,
        successful=ok, failed=int(stats.get("FailedCall(C)", "0")),
        retransmissions=int(stats.get("Retransmissions(C)", "0")), elapsed_s=elapsed,
        rate=ok / elapsed if elapsed > 0 else 0.0, stats=stats, output=text[-3000:])


def start_sipp(scenario: str | Path, local_ip: str, local_port: int, workdir: Path,
               **kw: Any) -> subprocess.Popen[bytes]:
    """Starts a SIPp server scenario (`-sf uas...`) in the background; stop it with stop_process."""
    cmd = sipp_command(scenario, None, local_ip, local_port, workdir, **kw)
    log = (workdir / f"sipp-{Path(scenario).stem}-{local_port}.out").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=workdir)
    log.close()
    wait_udp_bound(local_ip, local_port, proc)
    return proc


def wait_udp_bound(ip: str, port: int, proc: subprocess.Popen[bytes],
                   timeout: float = 10.0) -> None:
    """Polls until something is bound on ip:port (bind fails) or the process has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before binding")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((ip, port))
            except OSError:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing bound on {ip}:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL; only ever the process we started."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class ProxyProcess:
    """`python -m nodes.proxy --mode open` on loopback with a control socket."""

    def __init__(self, config: Path, listen: str, workdir: Path, *, port: int | None = None,
                 cpu: int | None = None, log_level: str = "WARNING",
                 events: bool = True) -> None:
        self.listen = listen
        self.port = port or free_port(listen)
        self.control_path = workdir / f"proxy-{self.port}.sock"
        self.events_path = workdir / f"proxy-{self.port}.jsonl"
        cmd = [sys.executable, "-m", "nodes.proxy", "--listen", listen, "--port",
               str(self.port), "--mode", "open", "--config", str(config),
               "--control", str(self.control_path), "--log-level", log_level,
               "--events", str(self.events_path if events else os.devnull)]
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self._out = (workdir / f"proxy-{self.port}.out").open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.control = NodeControl(self.control_path, timeout=10.0)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}: "
                                   f"{self.output()[-2000:]}")
            if self.control_path.exists():
                with contextlib.suppress(OSError):
                    self.control("status")
                    return
            time.sleep(0.05)
        raise RuntimeError(f"proxy not ready after {timeout} s: {self.output()[-2000:]}")

    @property
    def addr(self) -> str:
        return f"{self.listen}:{self.port}"

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("status")
        return result

    def output(self) -> str:
        path = Path(self._out.name)
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
        self._out.close()


def register_from(proxy: str, user: str, local_ip: str, local_port: int,
                  workdir: Path) -> SippResult:
    """One REGISTER of sip:user@DOMAIN from local_ip:local_port with that address as Contact.

    The proxy only accepts requests from a registered (ip, port), so a SIPp UAC or UAS is
    registered this way from the port it is about to use.
    """
    inf = write_inf(workdir / f"reg-{user}-{local_port}.csv", [(user, DOMAIN)])
    result = run_sipp("register.xml", proxy, local_ip, local_port, workdir, inf=inf, count=1,
                      timeout_s=10, wall_timeout=30)
    if not result.ok or result.successful != 1:
        raise RuntimeError(f"registering {user} from {local_ip}:{local_port} failed: "
                           f"exit {result.exit_code}, {result.failed} failed\n{result.output}")
    return result
