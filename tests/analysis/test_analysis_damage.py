"""Damaged run folders: every bad input is named (file, line or row, what is wrong) and
reported under Problems or as a bad record; nothing aborts the report, nothing is silently
wrong. Pure where possible; the tshark ones on the synthetic run of test_analysis_synthetic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from experiments.analysis import RunLogs, Trial, analyze, load_capabilities, load_trials
from experiments.capture import CaptureError, esp_sa_options, load_capture, run_tshark
from tests.analysis.test_analysis import TRIAL
from tests.analysis.test_analysis_synthetic import build_run

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
ROW = ('"IPv4","10.0.1.10","10.0.3.10","0x00001001","AES-CBC [RFC3602]",'
       '"0x' + "ab" * 16 + '","HMAC-SHA-256-128 [RFC4868]","0x' + "cd" * 32 + '"')


@pytest.mark.parametrize(("change", "message"), [
    ({"old": "a1"}, "trial field 'old' is str 'a1', not an object of strings"),
    ({"old": ["a1", "b1"]}, "trial field 'old' is list ['a1', 'b1'], not an object of strings"),
    ({"new": 5}, "trial field 'new' is int 5, not an object of strings"),
    ({"addresses": ["10.0.1.10"]}, "trial field 'addresses' is list ['10.0.1.10']"),
    ({"addresses": {"a1": 7}}, "trial field 'addresses': 'a1' is 7, not a string"),
    ({"mover": 1}, "trial field 'mover' is 1, not a string"),
    ({"scenario": "link-sideways"}, "unknown scenario 'link-sideways'"),
    ({"method": "teleport"}, "unknown method 'teleport'"),
    ({"t_trigger_ns": 9}, "times out of order"),
])
def test_trial_fields_of_the_wrong_type_are_named(change: dict[str, Any], message: str
                                                  ) -> None:
    with pytest.raises(ValueError, match=None) as exc:
        Trial.from_json({**TRIAL, **change})
    assert message in str(exc.value)


def test_a_delay_sweep_scenario_is_known() -> None:
    assert Trial.from_json({**TRIAL, "scenario": "link-planned-rtt100"}).ok


def test_bad_records_and_non_utf8_lines_are_listed_not_raised(tmp_path: Path) -> None:
    good = json.dumps(TRIAL)
    (tmp_path / "trials.jsonl").write_bytes(
        (good + "\n" + json.dumps({**TRIAL, "old": "a1"}) + "\n").encode() + b"\xff\xfe\n")
    trials, bad = load_trials(tmp_path)
    assert len(trials) == 1
    assert bad == ["trials.jsonl line 2: trial field 'old' is str 'a1', not an object of "
                   "strings", "trials.jsonl line 3: not UTF-8 text (byte 0)"]


def test_an_empty_trials_file_is_said(tmp_path: Path) -> None:
    (tmp_path / "trials.jsonl").write_text("")
    assert load_trials(tmp_path) == ([], ["no trials in trials.jsonl (it is empty): nothing "
                                          "to analyse"])


def test_esp_sa_bad_rows_are_named_by_line_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "esp_sa"
    bad_key = ROW.replace("0x" + "ab" * 16, "0xzz")
    path.write_bytes((ROW + "\n" + bad_key + "\n").encode() + b"\xff\n" + ROW[:40].encode())
    options, problems = esp_sa_options(path)
    assert options.count("-o") == 3 and f"uat:esp_sa:{ROW}" in options
    assert problems == [
        "esp_sa line 2: encryption key is not 0x<hex> of whole bytes: its SA is not decrypted",
        "esp_sa line 3: not UTF-8 text: its SA is not decrypted",
        "esp_sa line 4: 4 fields, not 8 (a torn or edited line?): its SA is not decrypted"]


def test_an_empty_esp_sa_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "esp_sa").write_text("")
    assert esp_sa_options(tmp_path / "esp_sa")[1] == [
        "esp_sa has no usable rows: SIP and RTP inside ESP not decrypted"]


def test_capabilities_that_are_not_an_object_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "capabilities.json").write_text("[1]")
    assert load_capabilities(tmp_path) == (None, [
        "capabilities.json is a JSON list, not an object: the lab's capabilities (ESP "
        "backend, netem) are unknown"])
    (tmp_path / "capabilities.json").write_text("{broken")
    caps, problems = load_capabilities(tmp_path)
    assert caps is None and problems[0].startswith("capabilities.json cannot be read (")


def test_bad_media_rows_and_unreadable_logs_are_problems(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "events").mkdir()
    rows = [{"t_ns": 1, "event": "rtp-rx", "seq": "abc", "ssrc": 1, "src": "10.0.0.1:4"},
            {"t_ns": 2, "event": "rtp-rx", "seq": 7, "ssrc": 1, "src": "10.0.0.1:4"}]
    (tmp_path / "media" / "b1-media.jsonl").write_text(
        json.dumps(rows[0]) + "\n[1]\n" + json.dumps(rows[1]) + "\n"
        + '{"t_ns": 3, "ev')  # a torn last line: skipped, not a problem
    (tmp_path / "events" / "a1.jsonl").mkdir()
    logs = RunLogs.load(tmp_path)
    assert [r.seq for r in logs.rtp_rx("b1")] == [7]
    assert logs.problems == [
        "events/a1.jsonl cannot be read (Is a directory): its events are missing from the "
        "analysis",
        "media/b1-media.jsonl: 1 line(s) skipped, not a JSON object with an int t_ns (line 2)",
        "media/b1-media.jsonl: 1 rtp-rx row(s) skipped, bad src, ssrc or seq (invalid literal "
        "for int() with base 10: 'abc')"]


@needs_tshark
def test_a_failing_tshark_is_an_error_even_with_output(tmp_path: Path) -> None:
    build_run(tmp_path)
    pcap = tmp_path / "pcaps" / "proxy-core.pcap"
    with pytest.raises(CaptureError, match="pcaps/proxy-core.pcap: tshark failed .exit 1.: "
                       "tshark refused a row of esp_sa"):
        run_tshark(pcap, ["-o", "uat:esp_sa:\"IPv4\",\"broken"], [])


@needs_tshark
def test_a_broken_cache_is_rebuilt_and_a_failed_run_never_cached(tmp_path: Path) -> None:
    build_run(tmp_path)
    pcap, cache = tmp_path / "pcaps" / "proxy-core.pcap", tmp_path / "analysis"
    cache.mkdir()
    (cache / "proxy-core.json").write_text("[]")
    cap = load_capture(pcap, tmp_path / "esp_sa", [], cache)
    assert len(cap.sip) == 16
    assert json.loads((cache / "proxy-core.json").read_text())["key"][0] == 3
    junk = tmp_path / "pcaps" / "junk-x.pcap"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CaptureError, match="pcaps/junk-x.pcap: tshark failed"):
        load_capture(junk, tmp_path / "esp_sa", [], cache)
    assert not (cache / "junk-x.json").exists()


@needs_tshark
def test_missing_broken_and_cut_short_captures_are_problems(tmp_path: Path) -> None:
    build_run(tmp_path)
    (tmp_path / "pcaps" / "b1-netb.pcap").unlink()
    (tmp_path / "pcaps" / "a1-wlan.pcap").write_bytes(bytes(range(256)) * 8)
    proxy = tmp_path / "pcaps" / "proxy-core.pcap"
    proxy.write_bytes(proxy.read_bytes()[:-30])
    (tmp_path / "events" / "b1.jsonl").unlink()
    summary = analyze(tmp_path)
    problems = summary["problems"][1:]  # [0]: the test run's own bad line
    assert problems[0].startswith('pcaps/a1-wlan.pcap: tshark failed (exit 2): tshark: The '
                                  'file "')
    assert problems[0].endswith(": not analysed (a1's RTP on the wire (media gap, loss, "
                                "handover where a1 receives) and the SIP it sent)")
    assert problems[1:] == [
        "pcaps/proxy-core.pcap is cut short (ends in a partial packet): what it held after "
        "that is lost",
        "no capture of b1 in pcaps/ (pcaps/b1-*.pcap missing): b1's RTP on the wire (media "
        "gap, loss, handover where b1 receives) and the SIP it sent not measured",
        "events/b1.jsonl is missing: b1's procedure events are not in the analysis (its "
        "detection, signalling and the capture vs event log checks are not measured)"]
    assert summary["trials"][0]["messages"] == 12  # the cut message came after the procedure
    assert "## Problems" in (tmp_path / "results.md").read_text()


@needs_tshark
def test_esp_in_use_without_esp_sa_is_a_problem(tmp_path: Path) -> None:
    build_run(tmp_path)
    (tmp_path / "capabilities.json").write_text(json.dumps({"ipsec_backend": "userspace"}))
    assert analyze(tmp_path, write=False)["problems"][1:] == [
        "esp_sa is missing, though the run used ESP: SIP and RTP inside ESP not decrypted "
        "(messages, RTP and handover times undercount)"]
