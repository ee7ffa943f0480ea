"""SIPp against the proxy process in open mode, on 127.0.0.x loopback (no root needed).

Many registrations for distinct AORs; a SIPp UAC calling a SIPp UAS through the proxy; our
terminal calling a SIPp UAS; and an unregistered SIPp source whose INVITE gets no answer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.sipp import (
    DOMAIN,
    ROOT,
    ProxyProcess,
    bench_config,
    free_port,
    register_from,
    run_sipp,
    start_sipp,
    stop_process,
    write_inf,
)
from experiments.control import NodeControl

pytestmark = pytest.mark.skipif(shutil.which("sipp") is None,
                                reason="SIPp (Debian sip-tester) is not installed")
N_AORS = 500
PROXY_IP, UAC_IP, UAS_IP, TERM_IP = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"


def until(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[ProxyProcess, Path]]:
    config = tmp_path / "bench.json"
    bench_config(config, N_AORS, extra=("uac", "uas", "caller"))
    proxy = ProxyProcess(config, PROXY_IP, tmp_path)
    try:
        yield proxy, config
    finally:
        proxy.stop()


def test_many_registrations(lab: tuple[ProxyProcess, Path], tmp_path: Path) -> None:
    proxy, _ = lab
    users = [f"t{i:04d}" for i in range(N_AORS)]
    inf = write_inf(tmp_path / "users.csv", [(u, DOMAIN) for u in users])
    result = run_sipp("register.xml", proxy.addr, UAC_IP, free_port(UAC_IP), tmp_path,
                      inf=inf, count=N_AORS, rate=2000, timeout_s=60)
    assert result.exit_code == 0, result.output
    assert (result.successful, result.failed) == (N_AORS, 0)
    status = proxy.status()
    regs = status["registrations"]
    assert set(regs) == {f"sip:{u}@{DOMAIN}" for u in users}
    one = regs[f"sip:t0123@{DOMAIN}"]
    assert len(one) == 1 and one[0]["contact"].startswith(f"sip:t0123@{UAC_IP}:")
    assert one[0]["source"][0] == UAC_IP and one[0]["expires_in"] > 3000
    assert status["counters"]["registered"] == N_AORS


def test_sipp_uac_calls_sipp_uas_through_proxy(lab: tuple[ProxyProcess, Path],
                                               tmp_path: Path) -> None:
    proxy, _ = lab
    uac_port, uas_port = free_port(UAC_IP), free_port(UAS_IP)
    register_from(proxy.addr, "uac", UAC_IP, uac_port, tmp_path)
    register_from(proxy.addr, "uas", UAS_IP, uas_port, tmp_path)
    calls = 5
    uas = start_sipp("uas_call.xml", UAS_IP, uas_port, tmp_path, count=calls, timeout_s=60)
    try:
        inf = write_inf(tmp_path / "call.csv", [("uac", "uas", DOMAIN)])
        result = run_sipp("uac_call.xml", proxy.addr, UAC_IP, uac_port, tmp_path, inf=inf,
                          count=calls, rate=10, timeout_s=60)
        assert result.exit_code == 0, result.output
        assert (result.successful, result.failed) == (calls, 0)
        assert uas.wait(30) == 0  # the UAS saw every call through to its BYE
    finally:
        stop_process(uas)
    counters = proxy.status()["counters"]
    assert counters["fwd-INVITE"] == calls and counters["fwd-BYE"] == calls
    assert counters["fwd-ACK"] == calls
    assert counters.get("dropped-unregistered", 0) == 0


def test_terminal_calls_sipp_uas(lab: tuple[ProxyProcess, Path], tmp_path: Path) -> None:
    proxy, config = lab
    uas_port, term_port = free_port(UAS_IP), free_port(TERM_IP)
    register_from(proxy.addr, "uas", UAS_IP, uas_port, tmp_path)
    uas = start_sipp("uas_call.xml", UAS_IP, uas_port, tmp_path, count=1, timeout_s=60)
    sock = tmp_path / "caller.sock"
    with (tmp_path / "caller.err").open("wb") as err:
        term = subprocess.Popen(
            [sys.executable, "-m", "nodes.terminal", "--name", "caller", "--config",
             str(config), "--local", TERM_IP, "--port", str(term_port), "--proxy", PROXY_IP,
             "--proxy-port", str(proxy.port), "--mode", "open", "--control", str(sock),
             "--events", str(tmp_path / "caller.jsonl")],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        until(sock.exists, "the terminal's control socket")
        ctl = NodeControl(sock)
        assert ctl("register", expires=300)["status"] == 200
        answer = ctl("call", to="uas")
        assert answer["status"] == 200
        call_id = answer["call_id"]
        assert ctl("status")["calls"][call_id]["state"] == "Confirmed"
        assert ctl("hangup", call_id=call_id)["status"] == 200
        assert ctl("status")["calls"] == {}
        assert uas.wait(30) == 0  # SIPp's one call: INVITE, 180, 200, ACK, BYE, 200
    finally:
        stop_process(term)
        stop_process(uas)
    counters = proxy.status()["counters"]
    assert counters["fwd-INVITE"] == 1 and counters["fwd-ACK"] == 1
    assert counters["fwd-BYE"] == 1


def test_unregistered_sipp_invite_times_out(lab: tuple[ProxyProcess, Path],
                                            tmp_path: Path) -> None:
    proxy, _ = lab
    uas_port = free_port(UAS_IP)
    register_from(proxy.addr, "uas", UAS_IP, uas_port, tmp_path)
    before = proxy.status()["counters"].get("dropped-unregistered", 0)
    inf = write_inf(tmp_path / "intruder.csv", [("uac", "uas", DOMAIN)])  # never registered
    result = run_sipp("uac_call.xml", proxy.addr, UAC_IP, free_port(UAC_IP), tmp_path,
                      inf=inf, count=1, timeout_s=30,
                      extra=["-max_invite_retrans", "2", "-nd"])
    assert result.exit_code != 0 and (result.successful, result.failed) == (0, 1)
    # Timed out: no response at all (a 403 or 404 would be an unexpected message instead).
    assert int(result.stats["FailedMaxUDPRetrans(C)"]) == 1, result.stats
    assert int(result.stats["FailedUnexpectedMessage(C)"]) == 0
    counters = proxy.status()["counters"]
    assert counters["dropped-unregistered"] > before
    assert counters.get("fwd-INVITE", 0) == 0
