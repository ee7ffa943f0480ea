"""Node command lines and start-up: a bad option, config file or address is one line on
stderr and exit code 2 (as argparse does), never a traceback."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from nodes import cli
from nodes.events import EventLog
from nodes.labconfig import ConfigError
from nodes.presence import Presence
from nodes.server import server_main
from nodes.sms import SessionManager
from nodes.trust import load_key

ROOT = Path(__file__).resolve().parents[2]
LONG_SOCKET = "/tmp/" + "x" * 200 + ".sock"


# -- the validated types ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "text", "error"),
    [
        (cli.ipv4, "nohost", "expected an IPv4 address, got 'nohost'"),
        (cli.ipv4, "999.1.1.1", "expected an IPv4 address"),
        (cli.ipv4, "10.1", "expected an IPv4 address"),
        (cli.ipv4, "0.0.0.0", "0.0.0.0 is not a unicast address"),
        (cli.ipv4, "224.0.0.1", "is not a unicast address"),
        (cli.local_ipv4, "192.0.2.1", "192.0.2.1 is not an address of this host"),
        (cli.local_ipv4, "localhost", "expected an IPv4 address"),
        (cli.port_number, "99999", "port 99999 is not in 1..65535"),
        (cli.port_number, "0", "port 0 is not in 1..65535"),
        (cli.port_number, "x", "expected a port number, got 'x'"),
        (cli.Seconds(60), "-1", "expected seconds greater than 0 and at most 60"),
        (cli.Seconds(60), "0", "expected seconds greater than 0"),
        (cli.Seconds(60), "nan", "expected seconds greater than 0"),
        (cli.Seconds(60), "inf", "expected seconds greater than 0"),
        (cli.Seconds(60), "61", "at most 60"),
        (cli.Seconds(), "soon", "expected seconds, got 'soon'"),
        (cli.existing_dir, "/nonexistent/m", "no directory '/nonexistent/m'"),
        (cli.interface_address, "x=1.2.3", "expected an IPv4 address"),
        (cli.interface_address, "x=999.1.1.1", "expected an IPv4 address"),
        (cli.interface_address, "../..=127.0.0.1", "expected IFNAME=IPV4"),
        (cli.interface_address, "127.0.0.1", "expected IFNAME=IPV4"),
        (cli.control_socket, "/nonexistent/x.sock", "no directory '/nonexistent'"),
        (cli.control_socket, LONG_SOCKET, "longer than 107 bytes"),
        (cli.control_socket, "", "empty path"),
        (cli.event_log_path, "/nonexistent/e.jsonl", "no directory '/nonexistent'"),
        (cli.event_log_path, "/tmp", "expected a file name"),
        (cli.log_level, "bogus", "log level 'bogus': expected one of DEBUG, INFO, WARNING"),
    ],
)
def test_bad_values(kind: Any, text: str, error: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        kind(text)
    assert error in str(err.value)


def test_good_values(tmp_path: Path) -> None:
    assert cli.ipv4("10.0.1.10") == "10.0.1.10"
    assert cli.local_ipv4("127.0.0.1") == "127.0.0.1"
    assert cli.port_number("5060") == 5060
    assert cli.Seconds(60)("0.1") == 0.1
    assert cli.existing_dir(str(tmp_path)) == str(tmp_path)
    assert cli.interface_address("a1-wlan=127.0.0.1") == ("a1-wlan", "127.0.0.1")
    assert cli.control_socket(str(tmp_path / "a1.sock")) == str(tmp_path / "a1.sock")
    assert cli.event_log_path("/dev/null") == "/dev/null"
    assert cli.log_level("info") == "INFO"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--t1", "-1"], "argument --t1: expected seconds greater than 0"),
        (["--t1", "nan"], "argument --t1: expected seconds greater than 0"),
        (["--log-level", "bogus"], "argument --log-level: log level 'bogus'"),
        (["--control", "/nonexistent/x.sock"], "argument --control: control socket"),
        (["--control", LONG_SOCKET], "longer than 107 bytes"),
        (["--events", "/nonexistent/e.jsonl"], "argument --events: event log"),
    ],
)
def test_shared_options_are_checked_when_parsed(capsys: pytest.CaptureFixture[str],
                                                args: list[str], error: str) -> None:
    parser = argparse.ArgumentParser(prog="node")
    cli.node_arguments(parser, credentials=True, trust=True)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert error in err and "Traceback" not in err


# -- the servers' start-up -------------------------------------------------------------------
def _config(tmp: Path, sms: str, presence: str = "192.0.2.12") -> Path:
    """The lab config with the servers somewhere else (192.0.2.x: TEST-NET, never local)."""
    data = json.loads((ROOT / "config" / "lab.json").read_text())
    data["servers"].update(sms=sms, presence=presence)
    path = tmp / "lab.json"
    path.write_text(json.dumps(data))
    return path


def _start(capsys: pytest.CaptureFixture[str], *args: str,
           cls: type[Any] = SessionManager) -> str:
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(server_main(cls, ["--mode", "open", *args]))
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1, out.err
    return out.err.strip()


def test_server_start_up_failures_are_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert _start(capsys, "--config", str(tmp_path)) == \
        f"sms: {tmp_path}: is a directory, not a file"
    assert _start(capsys, "--config", str(_config(tmp_path, "192.0.2.11"))) == \
        "sms: cannot listen on 192.0.2.11:5060: Cannot assign requested address"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.3.9.11", 5060))
        assert _start(capsys, "--config", str(_config(tmp_path, "127.3.9.11"))) == \
            "sms: cannot listen on 127.3.9.11:5060: Address already in use"
    assert _start(capsys, "--config", str(_config(tmp_path, "192.0.2.11")),
                  cls=Presence) == \
        "presence: cannot listen on 192.0.2.12:5060: Cannot assign requested address"


def test_run_node_and_starting(capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> int:
        with cli.starting("listen on 10.9.9.9:5060"):
            raise OSError(99, "Cannot assign requested address")
        return 0  # pragma: no cover

    assert cli.run_node("proxy", main()) == 2
    assert capsys.readouterr().err == \
        "proxy: cannot listen on 10.9.9.9:5060: Cannot assign requested address\n"

    async def ok() -> int:
        return 0

    assert cli.run_node("proxy", ok()) == 0


def test_event_log_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(cli.StartupError) as err:
        EventLog("a1", str(tmp_path / "missing" / "a1.jsonl"))
    assert str(err.value).startswith(f"cannot write the event log {tmp_path}/missing/a1.jsonl")
    assert isinstance(err.value, OSError)  # callers that caught OSError still do


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"key": 5}', 'expected {"key": "<hex>"}'),
        ("[1]", 'expected {"key": "<hex>"}'),
        ("[" * 3000 + "]" * 3000, 'expected {"key": "<hex>"}'),
        ('{"key": "0011"}', "at least 16 bytes"),
    ],
    ids=["int", "array", "nested", "short"],
)
def test_bad_trust_keys(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "trust.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=error.replace("{", r"\{").replace("[", r"\[")):
        load_key(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path)

