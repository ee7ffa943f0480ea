"""`make experiment`'s options: bad ones are one clear line and exit 2, before any lab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.experiment import main


@pytest.mark.parametrize(("argv", "error"), [
    (["--trials", "0"], "--trials must be 1..100, got 0"),
    (["--scenario", "nope"], "unknown scenario(s) nope; known: all, link-planned"),
    (["--scenario", "link-planned, nope"], "unknown scenario(s) nope;"),
    (["--scenario", " , "], "no scenario given; known: all, link-planned"),
])
def test_bad_options(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert error in capsys.readouterr().err


def test_probe_summary_counts_lost_and_late_packets(tmp_path: Path) -> None:
    from experiments.runner import probe_summary

    a1 = [{"event": "tx", "path": p, "seq": i} for p in ("wlan", "lte") for i in range(3)]
    b1 = [{"event": "rx", "path": "lte", "seq": i, "sent_ns": i * 10**9,
           "t_ns": i * 10**9 + 2_000_000} for i in range(3)]
    b1 += [{"event": "rx", "path": "wlan", "seq": 0, "sent_ns": 0, "t_ns": 1_500_000_000}]
    (tmp_path / "a1").write_text("".join(json.dumps(r) + "\n" for r in a1))
    (tmp_path / "b1").write_text("".join(json.dumps(r) + "\n" for r in b1))
    out = probe_summary(tmp_path / "a1", tmp_path / "b1")
    assert out[0].split() == ["path", "sent", "at", "b1", "lost", "echoed", "late", "max",
                              "delay"]
    assert out[1].split() == ["lte", "3", "3", "0", "0", "0", "2.0", "ms"]
    assert out[2].split() == ["wlan", "3", "1", "2", "0", "1", "1500.0", "ms"]


def test_decrypt_finds_the_runs_esp_sa_and_says_what_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.decrypt import esp_sa_for
    from experiments.decrypt import main as decrypt

    pcap = tmp_path / "run" / "pcaps" / "proxy-core.pcap"
    pcap.parent.mkdir(parents=True)
    pcap.write_bytes(b"")
    assert esp_sa_for(pcap) == (tmp_path / "run" / "esp_sa").resolve()
    with pytest.raises(SystemExit):
        decrypt([str(pcap)])
    assert "no esp_sa file at" in capsys.readouterr().err
    row = '"IPv4","10.0.1.10","10.0.0.10","0x00001001","NULL","","HMAC-SHA-1-96 [RFC2404]","0x01"'
    (tmp_path / "run" / "esp_sa").write_text(row + "\n" + row + "\n")
    assert decrypt([str(pcap), "--print-options"]) == 0
    out = capsys.readouterr().out
    assert out.count("uat:esp_sa:") == 1 and "esp.enable_encryption_decode:TRUE" in out


def test_plans_interleave_rounds_and_shuffle_methods_by_seed() -> None:
    from experiments.experiment import METHODS, plans

    one = plans(["link-planned", "terminal-switch"], 4, seed=7)
    assert one == plans(["link-planned", "terminal-switch"], 4, seed=7)
    assert [p.trial for p in one] == [t for t in range(1, 5) for _ in range(5)]
    for t in range(1, 5):  # every method once per round, scenario by scenario
        rnd = [(p.scenario, p.method) for p in one if p.trial == t]
        assert sorted(m for s, m in rnd[:3]) == sorted(METHODS["link"])
        assert sorted(m for s, m in rnd[3:]) == sorted(METHODS["terminal"])
    firsts = {p.method for p in one if p.scenario == "link-planned"
              and next(q for q in one if q.trial == p.trial) == p}
    assert len(firsts) > 1  # not always the same method first (seed 7)
