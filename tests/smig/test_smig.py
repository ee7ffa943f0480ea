"""SMIG message formats: round trips, exact errors (hostile bodies too), keys hidden."""

from __future__ import annotations

import json

import pytest

from nodes.smig import Rekey, SessionConfig, SwitchRequest, parse, parse_link_switch_body

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


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_deep(1000), "SMIG body is not valid JSON: nested deeper than 32 levels"),
        (b'{"type": "end", "session": "c", "reason": ' + _deep(900) + b"}",
         "SMIG body is not valid JSON: nested deeper than 32 levels"),
        (b'{"type": "end", "session": NaN}', "SMIG body is not valid JSON: NaN is not"),
        (b'{"type": "end", "session": "c", "a\\r\\nX: y": 1}',
         r"end: unknown field(s) 'a\r\nX: y'"),
        (b'{"type": "switch-done", "session": "c", "terminals": [1, null]}',
         "switch-done: field 'terminals' must be array of string"),
        (b'{"type": "presence-result", "session": "q", "user": "bob", "terminals": [1]}',
         "presence-result: field 'terminals' must be array of object"),
        (b'{"type": "link-config", "session": "c", "terminal": "a1", "address": "garbage",'
         b' "old-address": "10.0.1.10"}', "link-config: address 'garbage' is not an IPv4"),
        (b'{"type": "link-switch", "session": "c", "terminal": "a1", "address": "999.1.1.1"}',
         "link-switch: address '999.1.1.1' is not an IPv4 address"),
        (b'{"type": "registration", "session": "r", "terminal": "a1", "registered": true,'
         b' "address": "a1.example"}', "registration: address 'a1.example' is not an IPv4"),
        (b'{"type": "session-config", "session": "c", "terminal": "a2", "media": "audio",'
         b' "role": "offerer", "local-port": 41000, "peer-terminal": "b2",'
         b' "peer-address": "nohost", "peer-port": 41000}',
         "session-config: peer-address 'nohost' is not an IPv4 address"),
    ],
    ids=["nested-1000", "nested-field", "nan", "crlf-name", "list-items", "list-objects",
         "link-config-address", "link-switch-address", "registration-address",
         "peer-address"],
)
def test_hostile_bodies(data: bytes, error: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(data)
    assert str(err.value).startswith(error)


def _with(**fields: object) -> bytes:
    body = {"type": "switch-request", "session": "c", "new-terminal": "a2", "media": "video",
            "security": {"offer": "x", "answer": "y"}, "keys": KEYS, **fields}
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"security": {"offer": 5, "answer": 5}}, "security must be"),
        ({"security": {"offer": "x"}}, "security must be"),
        ({"keys": {"offer-to-answer": KEYS["offer-to-answer"]}}, "keys must have exactly"),
        ({"keys": {**KEYS, "answer-to-offer": "00"}}, "keys.answer-to-offer must have"),
        ({"keys": {**KEYS, "offer-to-answer": {"enc": "zz" * 16, "auth": "11" * 32}}},
         "keys.offer-to-answer.enc must be a hex string"),
        ({"keys": {**KEYS, "offer-to-answer": {"enc": 0, "auth": "11" * 32}}},
         "keys.offer-to-answer.enc must be a hex string"),
    ],
)
def test_key_material_has_the_exported_shape(fields: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(_with(**fields))
    assert error in str(err.value)
    assert "zz" * 16 not in str(err.value) and "11" * 32 not in str(err.value)  # no key values
    assert parse(_with()).keys == KEYS  # and the real shape parses


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_deep(1000), "link-switch body is not valid JSON: nested deeper than 32 levels"),
        (b'{"type": "link-switch", "sessions": ' + _deep(600) + b"}",
         "link-switch body is not valid JSON: nested deeper than 32 levels"),
        (b'{"type": "link-switch", "sessions": ["c"], "x\\ny": 1}',
         r"link-switch: unknown field(s) 'x\ny'"),
    ],
    ids=["nested-1000", "nested-sessions", "newline-name"],
)
def test_link_switch_body_errors(data: bytes, error: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_link_switch_body(data)
    assert str(err.value) == error
