# ruff: noqa: E501 - RFC vectors read better unwrapped
"""RFC 7616 Digest (SHA-256, qop=auth): the §3.9.1 example, round trips, errors, checks."""

from __future__ import annotations

import base64
import hashlib

import pytest

from nodes.sip.digest import (
    DigestChallenge,
    DigestCredentials,
    authorize,
    check,
    compute_response,
    new_nonce,
    nonce_bytes,
    password_from_psk,
    verify,
)
from nodes.sip.grammar import unfold
from nodes.sip.message import parse_message

pytestmark = pytest.mark.timeout(10)

# RFC 7616 §3.9.1, SHA-256 part, exactly as printed (folded lines).
RFC_CHALLENGE = unfold(
    'Digest\r\n'
    '    realm="http-auth@example.org",\r\n'
    '    qop="auth, auth-int",\r\n'
    '    algorithm=SHA-256,\r\n'
    '    nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",\r\n'
    '    opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"')
RFC_AUTHORIZATION = unfold(
    'Digest username="Mufasa",\r\n'
    '    realm="http-auth@example.org",\r\n'
    '    uri="/dir/index.html",\r\n'
    '    algorithm=SHA-256,\r\n'
    '    nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",\r\n'
    '    nc=00000001,\r\n'
    '    cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",\r\n'
    '    qop=auth,\r\n'
    '    response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",\r\n'
    '    opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"')
RFC_RESPONSE = "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"


def test_rfc7616_sha256_example_reproduced() -> None:
    ch = DigestChallenge.parse(RFC_CHALLENGE)
    assert (ch.realm, ch.algorithm, ch.qop) == ("http-auth@example.org", "SHA-256", ("auth", "auth-int"))
    assert ch.opaque == "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
    creds = authorize(ch, username="Mufasa", password="Circle of Life", method="GET",
                      uri="/dir/index.html", cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")
    assert creds.response == RFC_RESPONSE
    # our serialisation uses the RFC's parameter order: it reproduces the RFC text exactly
    assert creds.serialize() == RFC_AUTHORIZATION
    parsed = DigestCredentials.parse(RFC_AUTHORIZATION)
    assert parsed == creds
    assert check(parsed, ch, password="Circle of Life", method="GET", request_uri="/dir/index.html") is None


def test_rfc7616_response_computed_by_hand() -> None:
    def h(s: str) -> str:
        return hashlib.sha256(s.encode()).hexdigest()
    ha1 = h("Mufasa:http-auth@example.org:Circle of Life")
    ha2 = h("GET:/dir/index.html")
    want = h(f"{ha1}:7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v:00000001:"
             f"f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ:auth:{ha2}")
    assert want == RFC_RESPONSE
    assert compute_response(username="Mufasa", password="Circle of Life", realm="http-auth@example.org",
                            method="GET", uri="/dir/index.html",
                            nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", nc="00000001",
                            cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ") == want


@pytest.mark.parametrize("text", [
    RFC_CHALLENGE,
    'Digest realm="m2m.example", nonce="AAECAwQFBgcICQoLDA0ODw==", algorithm=SHA-256, qop="auth"',
    'digest  realm = "r" ,nonce="n",stale=TRUE,x-ext=tok,algorithm="SHA-256"',
])
def test_challenge_round_trip(text: str) -> None:
    assert DigestChallenge.parse(text).serialize() == text


def test_authorization_round_trip_with_odd_spacing() -> None:
    text = RFC_AUTHORIZATION.replace(", ", " ,  ").replace("qop=auth", 'qop="auth"')
    assert DigestCredentials.parse(text).serialize() == text
    assert DigestCredentials.parse(text).qop == "auth"


def test_built_challenge_and_lab_flow() -> None:
    psk = bytes.fromhex("00112233445566778899aabbccddeeff")
    password = password_from_psk(psk)
    assert password == "00112233445566778899aabbccddeeff"
    ch = DigestChallenge.new("m2m.example", opaque="op1")
    assert len(ch.nonce_bytes) == 16
    text = ch.serialize()
    assert text == f'Digest realm="m2m.example", nonce="{ch.nonce}", algorithm=SHA-256, qop="auth", opaque="op1"'
    seen = DigestChallenge.parse(text)  # what the UA receives
    assert seen == ch
    creds = authorize(seen, username="a1@m2m.example", password=password, method="REGISTER",
                      uri="sip:m2m.example", nc=1)
    wire = DigestCredentials.parse(creds.serialize())
    assert verify(wire, ch, password=password, method="REGISTER", request_uri="sip:m2m.example")
    wrong = password_from_psk(bytes(16))
    assert check(wire, ch, password=wrong, method="REGISTER") == "wrong response (password mismatch)"
    assert check(wire, ch, password=password, method="INVITE") == "wrong response (password mismatch)"
    assert check(wire, ch, password=password, method="REGISTER", request_uri="sip:other") == (
        "digest uri 'sip:m2m.example' is not the Request-URI 'sip:other'")
    other = DigestChallenge.new("m2m.example", opaque="op1")
    assert check(wire, other, password=password, method="REGISTER") == "nonce does not match the challenge"
    assert check(wire, DigestChallenge("elsewhere", ch.nonce, opaque="op1"), password=password,
                 method="REGISTER") == "realm 'm2m.example' is not 'elsewhere'"
    assert check(wire, DigestChallenge("m2m.example", ch.nonce, opaque="op2"), password=password,
                 method="REGISTER") == "opaque does not match the challenge"


def test_headers_through_the_sip_parser() -> None:
    ch = DigestChallenge("m2m.example", "AAECAwQFBgcICQoLDA0ODw==")
    raw = ("SIP/2.0 401 Unauthorized\r\n"
           "Via: SIP/2.0/UDP 10.0.1.10:5060;branch=z9hG4bKd1\r\n"
           "From: <sip:a1@m2m.example>;tag=1\r\nTo: <sip:a1@m2m.example>;tag=2\r\n"
           "Call-ID: d1@x\r\nCSeq: 1 REGISTER\r\n"
           f"WWW-Authenticate: {ch}\r\nContent-Length: 0\r\n\r\n").encode()
    msg = parse_message(raw)
    got = DigestChallenge.parse(msg.get("WWW-Authenticate") or "")
    assert got == ch and got.nonce_bytes == bytes(range(16))


def test_case_of_response_hex_does_not_matter() -> None:
    ch = DigestChallenge.parse(RFC_CHALLENGE)
    upper = DigestCredentials.parse(RFC_AUTHORIZATION.replace(RFC_RESPONSE, RFC_RESPONSE.upper()))
    assert verify(upper, ch, password="Circle of Life", method="GET")


@pytest.mark.parametrize(("text", "message"), [
    ('Basic realm="x"', "WWW-Authenticate: scheme 'Basic' is not Digest"),
    ("", "WWW-Authenticate: scheme '' is not Digest"),
    ("Digest", "WWW-Authenticate: no parameters"),
    ('Digest nonce="n"', "WWW-Authenticate: missing parameter 'realm'"),
    ('Digest realm="r"', "WWW-Authenticate: missing parameter 'nonce'"),
    ('Digest realm=r, nonce="n"', "WWW-Authenticate: realm must be a quoted string"),
    ('Digest realm="r", nonce="n", realm="s"', "WWW-Authenticate: duplicate parameter 'realm'"),
    ('Digest realm="r", NONCE="n", nonce="m"', "WWW-Authenticate: duplicate parameter 'nonce'"),
    ('Digest realm="r", nonce="n",', "WWW-Authenticate: trailing comma"),
    ('Digest realm="r" nonce="n"', "WWW-Authenticate: malformed parameter at 'realm=\"r\" nonce=\"n\"'"),
    ('Digest realm="r, nonce="n"', "WWW-Authenticate: malformed parameter at 'realm=\"r, nonce=\"n\"'"),
    ('Digest realm="r", nonce="n", stale=maybe', "WWW-Authenticate: stale must be true or false, not 'maybe'"),
    ('Digest realm="r", nonce="n", qop="auth, @x"', "WWW-Authenticate: malformed qop list 'auth, @x'"),
])
def test_malformed_challenges(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        DigestChallenge.parse(text)
    assert str(err.value) == message


@pytest.mark.parametrize(("old", "new", "message"), [
    ('username="Mufasa",', "", "Authorization: missing parameter 'username'"),
    ("nc=00000001", "nc=1", "Authorization: nc '1' is not 8 hex digits"),
    ("nc=00000001", 'nc="00000001"', "Authorization: nc must not be quoted"),
    ("nc=00000001,", "", "Authorization: qop=auth needs nc and cnonce"),
    (RFC_RESPONSE, RFC_RESPONSE[:-2], "Authorization: SHA-256 response has 62 hex digits, not 64"),
    (RFC_RESPONSE, "z" * 64, "Authorization: response is not hexadecimal"),
    ('uri="/dir/index.html"', "uri=/dir/index.html", "Authorization: malformed parameter at 'uri=/dir/index.html,'"),
    ('cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"', 'cnonce=""', "Authorization: empty cnonce"),
])
def test_malformed_authorizations(old: str, new: str, message: str) -> None:
    text = RFC_AUTHORIZATION.replace(old, new)
    assert text != RFC_AUTHORIZATION
    with pytest.raises(ValueError) as err:
        DigestCredentials.parse(text)
    assert str(err.value) == message


def test_refusals_other_than_the_response() -> None:
    ch = DigestChallenge.parse(RFC_CHALLENGE)
    md5 = DigestCredentials.parse(RFC_AUTHORIZATION.replace("algorithm=SHA-256", "algorithm=MD5"))
    assert check(md5, ch, password="Circle of Life", method="GET") == "algorithm 'MD5' is not SHA-256"
    int_ = DigestCredentials.parse(RFC_AUTHORIZATION.replace("qop=auth", "qop=auth-int"))
    assert check(int_, ch, password="Circle of Life", method="GET") == "qop 'auth-int' is not auth"


def test_ua_refuses_challenges_it_cannot_answer() -> None:
    md5 = DigestChallenge("r", "n", algorithm="MD5")
    with pytest.raises(ValueError, match="challenge algorithm 'MD5' not supported"):
        authorize(md5, username="u", password="p", method="REGISTER", uri="sip:r")
    no_auth = DigestChallenge("r", "n", qop=("auth-int",))
    with pytest.raises(ValueError, match="does not offer 'auth'"):
        authorize(no_auth, username="u", password="p", method="REGISTER", uri="sip:r")
    with pytest.raises(ValueError, match=r"Digest algorithm 'SHA-512-256' not supported \(SHA-256 only\)"):
        compute_response(username="u", password="p", realm="r", method="M", uri="u", nonce="n",
                          nc="00000001", cnonce="c", algorithm="SHA-512-256")


def test_nonces() -> None:
    n = new_nonce()
    assert len(base64.b64decode(n)) == 16 and n != new_nonce()
    assert len(nonce_bytes(new_nonce(32))) == 32
    with pytest.raises(ValueError, match="^nonce of 8 bytes, need at least 16$"):
        new_nonce(8)
    with pytest.raises(ValueError, match="^Digest nonce has 12 bytes, need at least 16$"):
        nonce_bytes(base64.b64encode(bytes(12)).decode())
    with pytest.raises(ValueError, match="^Digest nonce 'not base64!' is not base64$"):
        nonce_bytes("not base64!")
    with pytest.raises(ValueError, match="^Digest nonce 'é' is not base64$"):
        nonce_bytes("é")
    with pytest.raises(ValueError, match="^empty PSK$"):
        password_from_psk(b"")
