"""RFC 4475 torture tests: every message with the RFC's verdict, plus robustness sweeps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nodes.sip.checks import Policy, SipError, check_request, check_response, validate_request
from nodes.sip.headers import STAR, parse_date
from nodes.sip.message import Request, Response, SipParseError, error_response, parse_message
from nodes.sip.multipart import parse_multipart

pytestmark = pytest.mark.timeout(20)

DATA = Path(__file__).resolve().parents[1] / "data" / "rfc4475"
VERDICTS = {k: v for k, v in json.loads((DATA / "verdicts.json").read_text()).items()
            if not k.startswith("_")}
ROLES = ("uas", "proxy", "registrar")


def load(name: str) -> bytes:
    return (DATA / f"{name}.dat").read_bytes()


def test_all_49_messages_present() -> None:
    assert len(VERDICTS) == 49
    assert sorted(p.stem for p in DATA.glob("*.dat")) == sorted(VERDICTS)


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_verdict(name: str) -> None:
    v = VERDICTS[name]
    data = load(name)
    if v["parse"] != "ok":
        with pytest.raises(SipParseError) as info:
            parse_message(data)
        err = info.value
        assert str(err) == v["error"]
        if v["parse"] == "drop":
            assert err.status is None and error_response(err) is None
        else:
            assert err.status == v["parse"]
            resp = error_response(err)
            assert resp is not None and resp.status == v["parse"]
            # The refusal is itself a well-formed response carrying the request's Via.
            again = parse_message(bytes(resp))
            assert isinstance(again, Response) and again.get("via") is not None
        return
    msg = parse_message(data)
    for role in ROLES:
        if role not in v:
            continue
        want = v[role]
        if isinstance(msg, Request):
            assert check_request(msg, Policy(role=role)) == want, role
        else:
            assert check_response(msg, role) is (want is None), role
    check_expect(msg, v.get("expect", {}))


def check_expect(msg: Request | Response, expect: dict) -> None:
    for key, want in expect.items():
        if key == "method":
            assert isinstance(msg, Request) and msg.method == want
        elif key == "status":
            assert isinstance(msg, Response) and msg.status == want
        elif key == "reason":
            assert isinstance(msg, Response) and msg.reason == want
        elif key == "request_uri":
            assert isinstance(msg, Request) and str(msg.uri) == want
        elif key == "request_user":
            assert isinstance(msg, Request) and msg.uri.user_unescaped == want
        elif key == "vias":
            assert len(msg.vias) == want
        elif key == "via_transports":
            assert [v.transport for v in msg.vias] == want
        elif key == "top_branch":
            assert msg.vias[0].branch == want
        elif key == "max_forwards":
            assert msg.max_forwards == want
        elif key == "cseq":
            assert msg.cseq is not None and [msg.cseq.number, msg.cseq.method] == want
        elif key == "call_id":
            assert msg.call_id == want
        elif key == "to_tag":
            assert msg.to is not None and msg.to.tag == want
        elif key == "from_tag":
            assert msg.from_ is not None and msg.from_.tag == want
        elif key == "from_display":
            assert msg.from_ is not None and msg.from_.display_name == want
        elif key == "to_display":
            assert msg.to is not None and msg.to.display_name == want
        elif key == "to_uri":
            assert msg.to is not None and str(msg.to.uri) == want
        elif key == "from_uri":
            assert msg.from_ is not None and str(msg.from_.uri) == want
        elif key == "subject":
            assert msg.get("subject") == want
        elif key == "contacts":
            assert msg.contacts != STAR
            assert [str(c.uri) for c in msg.contacts] == want
        elif key == "contact_params":
            assert [n for c in msg.contacts for n, _ in c.params.items] == want
        elif key == "content_type":
            assert msg.content_type is not None and msg.content_type.mime == want
        elif key == "body_len":
            assert len(msg.body) == want
        else:
            raise AssertionError(f"unknown expectation {key}")


@pytest.mark.parametrize("name", sorted(n for n, v in VERDICTS.items() if v["parse"] == "ok"))
def test_round_trip_is_byte_exact(name: str) -> None:
    data = load(name)
    out = bytes(parse_message(data))
    # Over UDP octets past Content-Length are discarded: the rest must match exactly.
    assert data.startswith(out)
    assert parse_message(out).serialize() == out


def test_wsinv_details() -> None:
    msg = parse_message(load("wsinv"))
    assert isinstance(msg, Request)
    assert [v.sent_by[0] for v in msg.vias] == ["192.0.2.2", "spindle.example.com",
                                                 "192.168.255.111"]
    assert msg.vias[2].branch == "z9hG4bK30239"
    contact = msg.contacts[0]
    assert contact.display_name == 'Quoted string ""'
    assert contact.params.get("newparam") == "newvalue"
    assert "secondparam" in contact.params and contact.params.get("secondparam") is None
    assert contact.params.get("q") == "0.33"
    assert msg.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert msg.routes[0].uri.lr
    assert msg.to is not None and str(msg.to.uri) == "sip:alice1@chair-dnrc.example.com"


def test_intmeth_parameters_and_uri() -> None:
    msg = parse_message(load("intmeth"))
    assert isinstance(msg, Request)
    assert msg.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert msg.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert msg.from_ is not None
    assert msg.from_.params.get("fromParam''~+*_!.-%") == '"работающий"'
    assert msg.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"
    with pytest.raises(SipError) as info:
        validate_request(msg, Policy())
    assert info.value.status == 501
    assert dict(info.value.headers)["Allow"].startswith("ACK, BYE")


def test_esc01_escapes_compare_equal_to_unescaped() -> None:
    msg = parse_message(load("esc01"))
    assert isinstance(msg, Request)
    assert msg.uri.user_unescaped == "sips:user@example.com"
    assert msg.to is not None and msg.to.uri.user_unescaped == "user"
    assert msg.from_ is not None and msg.from_.uri.user_unescaped == "I have spaces"
    contact = msg.contacts[0].uri
    assert contact.user_unescaped == "caller"
    assert contact.equivalent(parse_message(load("esc01")).contacts[0].uri)
    assert msg.get("Content-Type") == "application/sdp"


def test_escnull_bindings_are_distinct() -> None:
    msg = parse_message(load("escnull"))
    keys = {c.uri.aor() for c in msg.contacts}
    assert keys == {"sip:\x00@host5.example.com", "sip:\x00\x00@host5.example.com"}
    assert msg.to is not None and msg.to.uri.user_unescaped == "null-\x00-null"


def test_esc02_escaped_header_name_is_an_extension_header() -> None:
    msg = parse_message(load("esc02"))
    assert msg.count("contact") == 2
    assert msg.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_dblreq_only_first_request_counts() -> None:
    data = load("dblreq")
    msg = parse_message(data)
    assert isinstance(msg, Request) and msg.method == "REGISTER" and msg.body == b""
    assert b"INVITE" not in bytes(msg)


def test_mpart01_binary_part_intact() -> None:
    msg = parse_message(load("mpart01"))
    ctype = msg.content_type
    assert ctype is not None and ctype.param("boundary") == "7a9cbec02ceef655"
    parts = parse_multipart(msg.body, ctype)
    assert [p.content_type for p in parts] == ["text/plain", "application/octet-stream"]
    assert parts[0].body == b"Hello"
    raw = load("mpart01")
    # The part is one DER SEQUENCE (30 82 01 52): its length field covers it exactly.
    assert parts[1].body in raw and len(parts[1].body) == 4 + 0x0152
    assert parts[1].body.startswith(b"0\x82\x01R\x06\t*\x86H\x86\xf7\r\x01\x07\x02")


def test_unreason_kept_byte_exact() -> None:
    data = load("unreason")
    msg = parse_message(data)
    assert isinstance(msg, Response)
    assert msg.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    assert bytes(msg).split(b"\r\n")[0] == data.split(b"\r\n")[0]


def test_noreason_status_line_keeps_trailing_space() -> None:
    msg = parse_message(load("noreason"))
    assert bytes(msg).startswith(b"SIP/2.0 100 \r\n")


def test_bext01_lists_unsupported_tags() -> None:
    msg = parse_message(load("bext01"))
    want = VERDICTS["bext01"]["unsupported"]
    for role in ("uas", "proxy"):
        with pytest.raises(SipError) as info:
            validate_request(msg, Policy(role=role))
        assert dict(info.value.headers)["Unsupported"] == want[role]


def test_baddate_date_is_refused_when_parsed() -> None:
    msg = parse_message(load("baddate"))
    with pytest.raises(ValueError, match="must be rfc1123-date in GMT"):
        parse_date(msg.get("date") or "")
    assert parse_date("Sat, 15 Oct 2005 04:44:56 GMT") == (15, "Oct", 2005, 4, 44, 56)


def test_scalar02_each_overlarge_value_is_refused() -> None:
    msg = parse_message(load("scalar02"))
    with pytest.raises(ValueError, match="CSeq number 36893488147419103232 out of range"):
        _ = msg.cseq
    with pytest.raises(ValueError, match="Max-Forwards 300 out of range"):
        _ = msg.max_forwards
    with pytest.raises(ValueError, match="Expires 1000.* out of range"):
        _ = msg.expires
    with pytest.raises(ValueError, match="Contact expires 280297596632815 out of range"):
        _ = msg.contacts


def test_multi01_single_valued_fields() -> None:
    msg = parse_message(load("multi01"))
    with pytest.raises(ValueError, match="multiple CSeq header fields"):
        _ = msg.cseq


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_truncated_datagrams_never_crash(name: str) -> None:
    data = load(name)
    for cut in range(0, len(data), 7):
        _parse_and_check(data[:cut])


def _parse_and_check(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipParseError as e:
        error_response(e)
        return
    if isinstance(msg, Request):
        for role in ROLES:
            check_request(msg, Policy(role=role))
    else:
        check_response(msg, "proxy")
    bytes(msg)


def test_random_mutations_never_crash() -> None:
    rng = random.Random(4475)
    corpus = [load(n) for n in sorted(VERDICTS)]
    alphabet = b' \t\r\n;:,<>"\\%@=/?0123456789abcZ\x00\xff'
    for _ in range(3000):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[pos] = rng.choice(alphabet)
            elif op < 0.7:
                data.insert(pos, rng.choice(alphabet))
            else:
                del data[pos]
        _parse_and_check(bytes(data))
