"""`python -m nodes.media send|recv` as processes: a short voice run over 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest

from nodes.media import main

ROOT = Path(__file__).resolve().parents[2]


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _poll(pred, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met before the timeout"
        time.sleep(0.05)


def test_send_recv_processes(tmp_path: Path) -> None:
    sample = tmp_path / "s.wav"
    with wave.open(str(sample), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x10\x00" * 4000)  # 0.5 s: 25 frames
    rx_log, tx_log, out = tmp_path / "rx.jsonl", tmp_path / "tx.jsonl", tmp_path / "out.wav"
    cmd = [sys.executable, "-m", "nodes.media"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rx = subprocess.Popen([*cmd, "recv", "--port", "0", "--wav", str(out), "--log",
                               str(rx_log), "--node", "b1", "--seconds", "60"], cwd=ROOT)
        procs.append(rx)
        _poll(lambda: any(r["event"] == "rx-start" for r in _records(rx_log)))
        port = _records(rx_log)[0]["port"]
        tx = subprocess.Popen([*cmd, "send", "--to", f"127.0.0.1:{port}", "--sample",
                               str(sample), "--once", "--log", str(tx_log),
                               "--node", "a1"], cwd=ROOT)
        procs.append(tx)
        assert tx.wait(timeout=30) == 0
        _poll(lambda: sum(r["event"] == "rtp-rx" for r in _records(rx_log)) >= 25)
        rx.send_signal(signal.SIGTERM)
        assert rx.wait(timeout=15) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rx_records = _records(rx_log)
    assert {r["node"] for r in rx_records} == {"b1"}
    stop = next(r for r in rx_records if r["event"] == "rx-stop")
    assert (stop["received"], stop["lost"]) == (25, 0)
    assert [r["event"] for r in _records(tx_log)] == ["tx-start", "tx-end", "tx-stop"]
    with wave.open(str(out), "rb") as w:
        assert w.getnframes() == 4000


@pytest.mark.parametrize("argv", [
    ["send", "--to", "nohost"], ["send", "--to", "1.2.3.4:0"], ["recv"],
])
def test_bad_arguments_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_unusable_sample_is_a_clear_error(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"nope")
    assert main(["send", "--to", "127.0.0.1:9", "--sample", str(bad), "--log",
                 str(tmp_path / "l.jsonl")]) == 2
    assert "not a PCM WAV file" in capsys.readouterr().err
