# ruff: noqa: E501 - long literal SIP/SDP test vectors read better unwrapped
"""Parser/serializer unit tests: URIs, header types, messages, builders, SDP."""

from __future__ import annotations

import pytest

from nodes.sip.headers import CSeq, MediaType, NameAddr, Via, parse_max_forwards
from nodes.sip.message import (
    HeaderField,
    Request,
    Response,
    SipParseError,
    parse_message,
    response_to,
)
from nodes.sip.sdp import Connection, SessionDescription
from nodes.sip.uri import AbsoluteUri, SipUri, parse_uri

pytestmark = pytest.mark.timeout(10)

REGISTER = (
    b"REGISTER sip:m2m.example SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.1.10:5060;branch=z9hG4bKabc;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:a1@m2m.example>;tag=x1\r\n"
    b"To: <sip:a1@m2m.example>\r\n"
    b"Call-ID: reg-1@10.0.1.10\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Contact: <sip:a1@10.0.1.10:5060>;expires=600\r\n"
    b"Content-Length: 0\r\n\r\n"
)


# ---- URIs --------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "sip:alice@atlanta.com",
    "SIP:ALICE@AtLanTa.CoM;Transport=udp",
    "sips:alice:secretword@[2001:db8::1]:5061;maddr=239.255.255.1;ttl=15",
    "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
    "sip:user;par=u%40example.net@example.com",
    "sip:+1-212-555-1212:1234@gateway.com;user=phone",
])
def test_uri_round_trip(text: str) -> None:
    uri = SipUri.parse(text)
    assert str(uri) == text
    assert str(SipUri.parse(str(uri.replace()))) == str(uri.replace())


def test_uri_fields() -> None:
    uri = SipUri.parse("sips:alice:pw@[2001:db8::1]:5061;maddr=239.255.255.1;lr?h=v")
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port) == (
        "sips", "alice", "pw", "[2001:db8::1]", 5061)
    assert uri.lr and uri.param("maddr") == "239.255.255.1" and uri.headers == [("h", "v")]
    assert uri.host_port() == ("2001:db8::1", 5061)
    assert str(uri.replace(port=None, headers=[])) == "sips:alice:pw@[2001:db8::1];maddr=239.255.255.1;lr"


def test_uri_equivalence_rules() -> None:
    a = SipUri.parse("sip:%61lice@AtLanTa.CoM;transport=TCP")
    b = SipUri.parse("sip:alice@atlanta.com;Transport=tcp")
    assert a.equivalent(b)
    assert not SipUri.parse("sip:alice@atlanta.com").equivalent(SipUri.parse("sip:ALICE@atlanta.com"))
    assert not SipUri.parse("sip:bob@biloxi.com").equivalent(
        SipUri.parse("sip:bob@biloxi.com;transport=udp"))
    assert not SipUri.parse("sip:bob@biloxi.com").equivalent(SipUri.parse("sip:bob@biloxi.com:5060"))


@pytest.mark.parametrize(("text", "error"), [
    ("sip:user@exa mple.com", "whitespace in SIP URI 'sip:user@exa mple.com'"),
    ("sip:@example.com", "malformed SIP URI 'sip:@example.com'"),
    ("sip:a@example.com:99999", "port 99999 out of range in 'sip:a@example.com:99999'"),
    ("sip:a@example.com;;lr", "invalid URI parameter '' in 'sip:a@example.com;;lr'"),
    ("sip:a@256.1.1.1", "invalid IPv4 address '256.1.1.1'"),
    ("sip:a@-bad-.com", "invalid host name '-bad-.com'"),
    ("<sip:a@b>", "URI must not be enclosed in <> here: '<sip:a@b>'"),
    ("nocolon", "invalid URI 'nocolon': no scheme"),
])
def test_uri_errors(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_uri(text)
    assert str(info.value) == error


def test_absolute_uri() -> None:
    uri = parse_uri("tel:+358-555-1234567;postd=pp22")
    assert isinstance(uri, AbsoluteUri) and uri.scheme == "tel" and str(uri) == "tel:+358-555-1234567;postd=pp22"


# ---- header types ------------------------------------------------------------
def test_name_addr_forms() -> None:
    na = NameAddr.parse('"A. G. Bell" <sip:agb@bell-telephone.com> ;tag=a48s')
    assert na.display_name == "A. G. Bell" and na.tag == "a48s"
    na = NameAddr.parse("sip:+12125551212@server.phone2net.com;tag=887s")
    assert na.display_name is None and na.tag == "887s" and not na.uri.params
    na = NameAddr.parse("Anonymous <sip:c8oqz84zk7z@privacy.org>;tag=hyh8")
    assert na.display_name == "Anonymous"
    built = NameAddr(SipUri.parse("sip:b1@m2m.example"), "Bob B").with_param("tag", "t9")
    assert str(built) == "Bob B <sip:b1@m2m.example>;tag=t9"
    assert str(NameAddr(SipUri.parse("sip:x@y"), 'Say "hi"')) == '"Say \\"hi\\"" <sip:x@y>'


@pytest.mark.parametrize(("text", "error"), [
    ('"Mr. J. User <sip:j.user@example.com>',
     "unterminated quoted string in display name: '\"Mr. J. User <sip:j.user@example.com>'"),
    ('"Watson, Thomas" < sip:t.watson@example.org >',
     "whitespace inside <> in '\"Watson, Thomas\" < sip:t.watson@example.org >'"),
    ("Bell, Alexander <sip:a.g.bell@example.com>", "invalid unquoted display name 'Bell, Alexander'"),
    ("sip:user@example.com?Route=%3Csip:sip.example.com%3E",
     "URI with '?' or ',' must be enclosed in <>: 'sip:user@example.com?Route=%3Csip:sip.example.com%3E'"),
    ("<sip:a@b;lr", "missing '>' in '<sip:a@b;lr'"),
    ("<sip:a@b>;;", "invalid header parameter at ';;'"),
])
def test_name_addr_errors(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        NameAddr.parse(text)
    assert str(info.value) == error


def test_via_parse_and_build() -> None:
    via = Via.parse("SIP / 2.0 / UDP  [2001:db8::9]:5070 ; branch=z9hG4bK77 ; rport=5071;received=192.0.2.1")
    assert via.transport == "UDP" and via.sent_by == ("2001:db8::9", 5070)
    assert via.rfc3261_branch and via.rport == 5071 and via.received == "192.0.2.1"
    built = Via("10.0.0.1", 5060, params=None).with_param("branch", "z9hG4bKx").with_param("rport", None)
    assert str(built) == "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx;rport"
    with pytest.raises(ValueError, match="malformed Via value 'SIP/2.0/UDP'"):
        Via.parse("SIP/2.0/UDP")


def test_cseq_and_scalars() -> None:
    assert CSeq.parse("0009\r\n INVITE".replace("\r\n", "")) == CSeq(9, "INVITE")
    with pytest.raises(ValueError) as info:
        CSeq.parse("2147483648 INVITE")
    assert str(info.value) == "CSeq number 2147483648 out of range"
    with pytest.raises(ValueError) as info:
        parse_max_forwards("-1")
    assert str(info.value) == "invalid Max-Forwards '-1'"
    mt = MediaType.parse('multipart/mixed ; boundary="abc"')
    assert mt.mime == "multipart/mixed" and mt.param("boundary") == "abc"


# ---- messages ----------------------------------------------------------------
def test_register_round_trip_and_typed_access() -> None:
    msg = parse_message(REGISTER)
    assert isinstance(msg, Request)
    assert bytes(msg) == REGISTER
    assert msg.top_via is not None and msg.top_via.branch == "z9hG4bKabc"
    assert msg.cseq == CSeq(1, "REGISTER") and msg.max_forwards == 70
    assert msg.contacts[0].params.get("expires") == "600"
    assert msg.get("v") == msg.get("VIA")


def test_modifications_reserialise_canonically() -> None:
    msg = parse_message(REGISTER)
    msg.add("Via", "SIP/2.0/UDP 10.0.0.5;branch=z9hG4bKtop", top=True)
    msg.set("Max-Forwards", 69)
    out = bytes(msg)
    assert b"Via: SIP/2.0/UDP 10.0.0.5;branch=z9hG4bKtop\r\nVia: SIP/2.0/UDP 10.0.1.10" in out
    assert b"Max-Forwards: 69\r\n" in out
    again = parse_message(out)
    assert [v.branch for v in again.vias] == ["z9hG4bKtop", "z9hG4bKabc"]
    assert again.pop_top("via") == "SIP/2.0/UDP 10.0.0.5;branch=z9hG4bKtop"
    assert bytes(again) == REGISTER.replace(b"Max-Forwards: 70", b"Max-Forwards: 69")


def test_pop_top_splits_comma_lists() -> None:
    msg = Request("OPTIONS", "sip:x@y", [("Via", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2")])
    assert msg.pop_top("Via") == "SIP/2.0/UDP a;branch=z9hG4bK1"
    assert [v.host for v in msg.vias] == ["b"]


def test_body_setter_updates_content_length() -> None:
    msg = parse_message(REGISTER)
    msg.set_body(b'{"type": "link-switch"}', "application/smig+json")
    again = parse_message(bytes(msg))
    assert again.body == b'{"type": "link-switch"}' and again.content_length == 23


def test_builder_and_response_to() -> None:
    req = Request("MESSAGE", "sip:b1@m2m.example", [
        ("Via", "SIP/2.0/UDP 10.0.1.10:5060;branch=z9hG4bKm1"),
        ("Max-Forwards", 70), ("From", "<sip:a1@m2m.example>;tag=f1"),
        ("To", "<sip:b1@m2m.example>"), ("Call-ID", "c1"), ("CSeq", "2 MESSAGE"),
        ("Content-Type", "text/plain")], body=b"hi")
    data = bytes(req)
    assert data.endswith(b"Content-Length: 2\r\n\r\nhi")
    assert bytes(parse_message(data)) == data
    resp = response_to(req, 200, to_tag="t7", headers=[("Server", "smig-lab")])
    assert isinstance(resp, Response) and resp.reason == "OK"
    assert resp.to is not None and resp.to.tag == "t7"
    names = [h.name for h in resp.headers]
    assert names == ["Via", "From", "To", "Call-ID", "CSeq", "Server", "Content-Length"]
    trying = response_to(req, 100, to_tag="t7")
    assert trying.to is not None and trying.to.tag is None


@pytest.mark.parametrize(("data", "error", "status"), [
    (b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n", "no empty line after the header section", None),
    (b"INVITE sip:a@b SIP/2.0\r\n Via: x\r\n\r\n", "header section starts with a continuation line", None),
    (b"INVITE sip:a@b SIP/2.0\r\nVia x\r\n\r\n", "header line without colon: 'Via x'", None),
    (b"INVITE sip:a@b SIP/2.0\r\nV(a: x\r\n\r\n", "invalid header name 'V(a'", None),
    (b"INVITE sip:a@b SIP/2.0\r\nVia: x\nTo: y\r\n\r\n", "bare CR or LF in the header section", None),
    (b"INVITE sip:a@b SIP/2.0\r\nl: 12abc\r\n\r\n", "invalid Content-Length '12abc'", 400),
    (b"INV(TE sip:a@b SIP/2.0\r\nl: 0\r\n\r\n", "invalid method 'INV(TE'", 400),
    (b"INVITE sip:a@b SIP/2\r\nl: 0\r\n\r\n", "invalid SIP-Version 'SIP/2'", 400),
    (b"SIP/2.0 099 Low\r\nl: 0\r\n\r\n", "status code 99 out of range 100-699", None),
    (b"SIP/2.0 700 High\r\nl: 0\r\n\r\n", "status code 700 out of range 100-699", None),
])
def test_framing_errors(data: bytes, error: str, status: int | None) -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert str(info.value) == error
    assert info.value.status == status


def test_leading_crlf_and_header_field_raw_kept() -> None:
    msg = parse_message(b"\r\n\r\n" + REGISTER)
    assert bytes(msg) == REGISTER
    f = HeaderField("Subject", "x")
    assert f.line() == "Subject: x" and f.key == "subject"


# ---- SDP -----------------------------------------------------------------------
SDP = (
    b"v=0\r\no=a1 2890844526 2890844527 IN IP4 10.0.1.10\r\ns=-\r\nc=IN IP4 10.0.1.10\r\n"
    b"t=0 0\r\nm=audio 49170 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=m2m-key:q0J1bEJzY2hVbGx5UmFuZG9t;spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128\r\n"
    b"a=x-unknown:keep  these   spaces\r\na=sendrecv\r\n"
    b"m=video 51372 RTP/AVP 31\r\nc=IN IP4 10.0.1.11\r\na=rtpmap:31 H261/90000\r\n"
)


def test_sdp_round_trip_and_views() -> None:
    sd = SessionDescription.parse(SDP)
    assert bytes(sd) == SDP
    assert sd.connection == Connection("IN", "IP4", "10.0.1.10")
    assert sd.media_connection(0) == Connection("IN", "IP4", "10.0.1.10")
    assert sd.media_connection(1) == Connection("IN", "IP4", "10.0.1.11")
    audio = sd.media[0]
    assert (audio.media, audio.port, audio.proto, audio.formats) == ("audio", 49170, "RTP/AVP", ["0", "8"])
    assert audio.attribute("m2m-key") == "q0J1bEJzY2hVbGx5UmFuZG9t;spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128"
    assert audio.attribute("x-unknown") == "keep  these   spaces"
    assert audio.has_attribute("sendrecv") and audio.attribute("sendrecv") is None
    assert sd.origin[5] == "10.0.1.10"


def test_sdp_edits() -> None:
    sd = SessionDescription.parse(SDP)
    sd.media[0].port = 50000
    sd.media[0].remove_attributes("m2m-key")
    sd.media[0].add_attribute("m2m-key", "bm9uY2U=;spi=5;ealg=null;alg=hmac-sha-1-96")
    sd.set_connection(Connection("IN", "IP4", "10.0.2.10"))
    again = SessionDescription.parse(bytes(sd))
    assert again.media[0].port == 50000 and again.connection is not None
    assert again.connection.address == "10.0.2.10"
    assert again.media[0].attributes("m2m-key") == ["bm9uY2U=;spi=5;ealg=null;alg=hmac-sha-1-96"]


@pytest.mark.parametrize(("data", "error"), [
    (b"o=x\r\n", "SDP must start with v="),
    (b"v=0\r\nm =video 3227 RTP/AVP 31\r\n", "invalid SDP line 'm =video 3227 RTP/AVP 31'"),
    (b"v=0\r\nm=video x RTP/AVP 31\r\n", "malformed SDP m= line 'video x RTP/AVP 31'"),
    (b"", "empty SDP"),
])
def test_sdp_errors(data: bytes, error: str) -> None:
    with pytest.raises(ValueError) as info:
        SessionDescription.parse(data)
    assert str(info.value) == error
