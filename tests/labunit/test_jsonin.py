"""JSON from outside: every failure is one ValueError naming what was read and why."""

from __future__ import annotations

import json

import pytest

from nodes.jsonin import MAX_DEPTH, JsonError, loads


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_nesting_up_to_the_limit_loads() -> None:
    assert loads(nested(MAX_DEPTH), "x") == json.loads(nested(MAX_DEPTH))
    assert loads(b'{"a": {"b": [1, 2.5, "c", null, true]}}') == {"a": {"b": [1, 2.5, "c",
                                                                           None, True]}}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 500, 1000, 100_000])
def test_deeper_nesting_is_a_value_error_whatever_the_stack(depth: int) -> None:
    # json.loads raises RecursionError (no ValueError) from about 1000 levels on.
    for data in (nested(depth), b'{"k":' * depth + b"1" + b"}" * depth):
        with pytest.raises(JsonError) as err:
            loads(data, "request")
        assert str(err.value) == f"request is not valid JSON: nested deeper than {MAX_DEPTH} levels"


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"{nope", "Expecting property name"),
        (b"\xff\xfe\x00", "codec can't decode"),
        (b"NaN", "NaN is not a JSON number"),
        (b'{"t": -Infinity}', "-Infinity is not a JSON number"),
        (b"[1e400]", "number 1e400 is out of range"),
        (b"9" * 5000, "Exceeds the limit"),  # int() refuses 4300+ digits
        (b"", "Expecting value"),
    ],
)
def test_malformed_input(data: bytes, detail: str) -> None:
    with pytest.raises(ValueError) as err:
        loads(data, "body")
    assert str(err.value).startswith("body is not valid JSON: ")
    assert detail in str(err.value)
    assert isinstance(err.value, JsonError) and detail in err.value.detail
