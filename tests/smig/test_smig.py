"""SMIG message formats: round trips, exact errors, keys hidden."""

from __future__ import annotations

import pytest

from nodes.smig import Rekey, SessionConfig, SwitchRequest, parse

KEYS = {"offer-to-answer": {"enc": "00" * 16, "auth": "11" * 32},
        "answer-to-offer": {"enc": "22" * 16, "auth": "33" * 32}}


def test_round_trip_and_stripping() -> None:
    req = SwitchRequest("cid-1@10.0.1.10", "a2", "video", "reuse", "a1",
                        {"offer": "x", "answer": "y"}, KEYS)
    data = req.serialize()
    assert parse(data) == req
    assert data.startswith(b'{"from-terminal":"a1","keys":')
    fwd = req.stripped()
    assert fwd.keys is None and fwd.security is None
    assert b"keys" not in fwd.serialize() and b"security" not in fwd.serialize()
    assert "00000000" not in repr(req) and "keys=<hidden>" in repr(req)


def test_session_config_round_trip() -> None:
    cfg = SessionConfig("cid", "a2", "video", "offerer", 41002, "b2", "10.0.3.20", 41002)
    assert parse(cfg.serialize()) == cfg


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{", "SMIG body is not valid JSON"),
        (b"[]", "SMIG body must be a JSON object"),
        (b'{"type": "teleport", "session": "c"}', "unknown SMIG type 'teleport'"),
        (b'{"type": "switch-request", "session": "c", "media": "video"}',
         "switch-request: missing field 'new-terminal'"),
        (b'{"type": "switch-request", "session": "c", "new-terminal": 2, "media": "video"}',
         "switch-request: field 'new-terminal' must be string"),
        (b'{"type": "switch-request", "session": "c", "new-terminal": "a2", "media": "smell"}',
         "switch-request: media 'smell' not one of audio, video"),
        (b'{"type": "switch-request", "session": "", "new-terminal": "a2", "media": "video"}',
         "switch-request: empty session"),
        (b'{"type": "end", "session": "c", "colour": 1}', "end: unknown field(s) colour"),
        (b'{"type": "rekey", "session": "c", "phase": "offer", "terminal": "a2"}',
         "rekey offer: missing key"),
        (b'{"type": "session-config", "session": "c", "terminal": "a2", "media": "audio",'
         b' "role": "offerer", "local-port": 0, "peer-terminal": "b2",'
         b' "peer-address": "10.0.3.20", "peer-port": 41000}',
         "session-config: local-port 0 out of range"),
        (b'{"type": "switch-response", "session": "c", "accept": "yes"}',
         "switch-response: field 'accept' must be boolean"),
    ],
)
def test_errors(data: bytes, error: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(data)
    assert str(err.value) == error or str(err.value).startswith(error)


def test_rekey_done_needs_no_key() -> None:
    assert parse(Rekey("c", "done", "a2").serialize()) == Rekey("c", "done", "a2")
