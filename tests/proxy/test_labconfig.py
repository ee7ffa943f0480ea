"""Lab config and credentials: the shipped files load, bad files get precise errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes.labconfig import ConfigError, Credentials, LabConfig

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads() -> None:
    cfg = LabConfig.load(ROOT / "config" / "lab.json")
    assert cfg.users == {"alice": ["a1", "a2"], "bob": ["b1", "b2"]}
    assert cfg.may_contact("a1", "b2") and cfg.may_contact("a1", "a2")
    assert not cfg.may_contact("a1", "zz")
    assert cfg.terminal_of("sip:a2@m2m.example").capabilities == ("audio", "video")
    assert cfg.terminal_of("sip:a2@elsewhere.example") is None
    creds = Credentials.load(ROOT / "config" / "credentials.json")
    psk = creds.psk("a1")
    assert psk is not None and len(psk) == 32
    assert psk.hex() not in repr(creds)


def test_non_friends() -> None:
    cfg = LabConfig.from_dict({
        "domain": "m2m.example",
        "users": {"alice": {"terminals": {"a1": ["audio"]}},
                  "bob": {"terminals": {"b1": ["audio"]}}},
        "friends": [],
        "servers": {"proxy": "10.0.0.10", "sms": "10.0.0.11", "presence": "10.0.0.12"},
    })
    assert not cfg.may_contact("a1", "b1")


GOOD = {"domain": "m2m.example", "users": {"alice": {"terminals": {"a1": ["audio"]}}},
        "servers": {"proxy": "10.0.0.10", "sms": "10.0.0.11", "presence": "10.0.0.12"}}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"domain": "M2M!"}, "'domain' must be a lower-case host name"),
        ({"users": {}}, "'users' must be a non-empty object"),
        ({"users": {"Alice": {"terminals": {"a1": ["audio"]}}}}, "bad user name 'Alice'"),
        ({"users": {"alice": {"terminals": {"a1": ["smell"]}}}}, "capabilities must be"),
        ({"friends": [["alice", "zed"]]}, "expected two different known users"),
        ({"servers": {"proxy": "10.0.0.10"}}, "'servers' must give exactly"),
        ({"servers": {"proxy": "x", "sms": "10.0.0.11", "presence": "10.0.0.12"}},
         "server 'proxy': bad IPv4 address 'x'"),
        ({"colour": "blue"}, "unknown key(s): colour"),
        ({"friends": [[["alice"], "bob"]]}, "friends entry [['alice'], 'bob']: expected two"),
        ({"friends": [["alice", {"x": 1}]]}, "expected two different known users"),
        ({"friends": "alice,bob"}, "'friends' must be a list of [user, user] pairs"),
        ({"friends": [["alice"]]}, "expected two different known users"),
        ({"servers": {"proxy": "999.1.1.1", "sms": "10.0.0.11", "presence": "10.0.0.12"}},
         "server 'proxy': bad IPv4 address '999.1.1.1'"),
        ({"servers": {"proxy": "10.1", "sms": "10.0.0.11", "presence": "10.0.0.12"}},
         "server 'proxy': bad IPv4 address '10.1'"),
        ({"users": {"alice": {"terminals": {"proxy": ["audio"]}}}},
         "terminal name 'proxy' is a server's name"),
        ({"users": {"alice": {"terminals": {"a1": ["audio"]}, "pets": 1}}},
         "user 'alice': unknown key(s): pets"),
        ({"users": {"alice": {"terminals": {"a1": [["audio"]]}}}}, "capabilities must be"),
    ],
)
def test_bad_config(change: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as err:
        LabConfig.from_dict({**GOOD, **change}, "lab.json")
    assert str(err.value).startswith("lab.json: ")
    assert error in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        LabConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Credentials.load(bad)
    secret = "00" * 15 + "zz"
    bad.write_text(json.dumps({"a1": secret}))
    with pytest.raises(ConfigError) as err:
        Credentials.load(bad)
    assert "PSK of 'a1' must be 16 to 64 bytes of hex" in str(err.value)
    assert secret not in str(err.value)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        LabConfig.load(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="not valid JSON: nested deeper than 32 levels"):
        LabConfig.load(deep)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Credentials.load(binary)


def test_require_terminal() -> None:
    cfg = LabConfig.load(ROOT / "config" / "lab.json")
    assert cfg.require_terminal("a2").user == "alice"
    with pytest.raises(ConfigError) as err:
        cfg.require_terminal("zz")
    assert str(err.value).endswith("lab.json: no terminal 'zz' (terminals: a1, a2, b1, b2)")
