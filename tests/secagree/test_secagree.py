# ruff: noqa: E501 - header vectors read better unwrapped
"""Security-Client/-Server/-Verify: parsing, round trips, errors, negotiation, downgrade."""

from __future__ import annotations

import pytest

from nodes.sip.message import parse_message
from nodes.sip.secagree import (
    DEFAULT_SUITES,
    SecAgreeError,
    SecurityMechanism,
    SecurityVerifyMismatch,
    Suite,
    choose_mechanism,
    offer,
    parse_mechanisms,
    serialize_mechanisms,
    verify_header_values,
    verify_security_verify,
)

pytestmark = pytest.mark.timeout(10)

M2MS = "ipsec-m2ms;alg=hmac-sha-256-128;ealg=aes-cbc;prot=esp;mod=trans;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064"


def test_typed_view_of_a_mechanism() -> None:
    m = SecurityMechanism.parse(M2MS)
    assert m.mechanism == "ipsec-m2ms"
    assert (m.alg, m.ealg, m.prot, m.mod) == ("hmac-sha-256-128", "aes-cbc", "esp", "trans")
    assert (m.spi_c, m.spi_s, m.port_c, m.port_s) == (1111, 2222, 5062, 5064)
    assert m.q is None
    assert m.unsupported_reason() is None


def test_builder_serialises_in_annex_h_order() -> None:
    m = SecurityMechanism.ipsec("hmac-sha-256-128", "aes-cbc", 1111, 2222, 5062, 5064)
    assert str(m) == M2MS
    assert str(SecurityMechanism.ipsec("hmac-sha-1-96", "null", 300, 301, 1, 2, q="0.5")) == (
        "ipsec-m2ms;alg=hmac-sha-1-96;ealg=null;prot=esp;mod=trans;spi-c=300;spi-s=301;port-c=1;port-s=2;q=0.5")
    assert SecurityMechanism.parse(str(m)) == m


@pytest.mark.parametrize("text", [
    M2MS,
    "IPSEC-M2MS ; ALG=HMAC-SHA-256-128 ;ealg = aes-cbc;spi-c=0001111;spi-s=2222;port-c=5062;port-s=5064;q=0.500",
    'ipsec-m2ms;port-s=5064;port-c=5062;spi-s=4294967295;spi-c=256;ealg=null;alg=hmac-sha-1-96;x-ext="a, b";flag',
    "ipsec-3gpp;alg=hmac-md5-96;ealg=des-ede3-cbc;prot=esp;mod=trans;spi-c=4294967295;spi-s=67890;port-c=61676;port-s=61662",
    "digest;d-alg=md5;d-qop=auth;d-ver=\"0123456789abcdef0123456789abcdef\"",
    "tls;q=0.2;test=123",
    "ipsec-ike",
])
def test_parse_serialize_round_trip_is_byte_exact(text: str) -> None:
    assert SecurityMechanism.parse(text).serialize() == text
    assert SecurityMechanism.parse("  " + text + "\t").serialize() == text


def test_header_values_may_repeat_and_list_several_mechanisms() -> None:
    values = [f"{M2MS}, tls;q=0.2", "digest;q=0.1"]
    mechs = parse_mechanisms(values)
    assert [m.mechanism for m in mechs] == ["ipsec-m2ms", "tls", "digest"]
    assert serialize_mechanisms(mechs) == f"{M2MS}, tls;q=0.2, digest;q=0.1"


def test_quoted_commas_do_not_split_mechanisms() -> None:
    mechs = parse_mechanisms(['tls;x="a,b", digest'])
    assert [str(m) for m in mechs] == ['tls;x="a,b"', "digest"]


def test_security_headers_through_the_sip_parser() -> None:
    raw = (
        "REGISTER sip:m2m.example SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.0.1.10:5060;branch=z9hG4bKsa1\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:a1@m2m.example>;tag=1\r\n"
        "To: <sip:a1@m2m.example>\r\n"
        "Call-ID: sa-1@10.0.1.10\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"security-client: {M2MS}\r\n"
        "Security-Client: ipsec-m2ms;alg=hmac-sha-1-96;ealg=null;spi-c=1111;spi-s=2222;port-c=5062;\r\n"
        " port-s=5064, tls\r\n"
        "Require: sec-agree\r\n"
        "Content-Length: 0\r\n\r\n").encode()
    msg = parse_message(raw)
    mechs = parse_mechanisms(msg.values("Security-Client"))
    assert len(mechs) == 3
    assert mechs[1].alg == "hmac-sha-1-96" and mechs[1].port_s == 5064
    assert choose_mechanism(mechs) is mechs[0]
    assert msg.serialize() == raw


# ---- RFC 3329 §3 example (mechanisms ipsec-ike / tls / digest) --------------------------

RFC3329_CLIENT = ["tls", "digest"]                       # (1) OPTIONS
RFC3329_SERVER = ["ipsec-ike;q=0.1", "tls;q=0.2"]        # (2) 494
RFC3329_VERIFY = ["ipsec-ike;q=0.1", "tls;q=0.2"]        # (3) INVITE over TLS


def test_rfc3329_example() -> None:
    client = parse_mechanisms(RFC3329_CLIENT)
    server = parse_mechanisms(RFC3329_SERVER, "Security-Server")
    assert [m.name for m in client] == ["tls", "digest"]
    assert [(m.name, str(m.q)) for m in server] == [("ipsec-ike", "0.1"), ("tls", "0.2")]
    # The client supports tls and digest: it picks the server's highest-q one it supports.
    client_prefs = [Suite.named("tls"), Suite.named("digest")]
    assert choose_mechanism(server, client_prefs).name == "tls"
    # Without tls on the client side, nothing it supports is in the server's list.
    with pytest.raises(SecAgreeError, match=r"no acceptable security mechanism offered \(ipsec-ike, tls\)"):
        choose_mechanism(server, [Suite.named("digest")])
    verify_header_values(RFC3329_VERIFY, server)
    verify_header_values(["tls;q=0.2, ipsec-ike;q=0.1"], server)  # order is not significant
    with pytest.raises(SecurityVerifyMismatch, match="missing ipsec-ike;q=0.1"):
        verify_header_values(["tls;q=0.2"], server)


# ---- malformed → ValueError (400) ----------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("ipsec-m2ms;alg=hmac-sha-256-128;ealg=aes-cbc;spi-c=1111;spi-s=2222;port-c=5062",
     "Security-Client ipsec-m2ms: missing required parameter 'port-s'"),
    ("ipsec-m2ms;alg=hmac-sha-256-128;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064",
     "Security-Client ipsec-m2ms: missing required parameter 'ealg'"),
    ("ipsec-m2ms;alg;ealg=aes-cbc;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064",
     "Security-Client ipsec-m2ms: parameter 'alg' has no value"),
    (M2MS.replace("spi-c=1111", "spi-c=12"),
     "Security-Client ipsec-m2ms: spi-c 12 out of range (256..4294967295)"),
    (M2MS.replace("spi-s=2222", "spi-s=4294967296"),
     "Security-Client ipsec-m2ms: spi-s 4294967296 out of range (256..4294967295)"),
    (M2MS.replace("spi-s=2222", "spi-s=99999999999999999999"),
     "Security-Client ipsec-m2ms: spi-s 999999999999... out of range (256..4294967295)"),
    (M2MS.replace("spi-c=1111", "spi-c=0x457"),
     "Security-Client ipsec-m2ms: spi-c '0x457' is not a decimal number"),
    (M2MS.replace("spi-c=1111", "spi-c=-5"),
     "Security-Client ipsec-m2ms: spi-c '-5' is not a decimal number"),
    (M2MS.replace("port-c=5062", "port-c=0"),
     "Security-Client ipsec-m2ms: port-c 0 out of range (1..65535)"),
    (M2MS.replace("port-s=5064", "port-s=65536"),
     "Security-Client ipsec-m2ms: port-s 65536 out of range (1..65535)"),
    (M2MS.replace("port-s=5064", 'port-s="5064"'),
     "Security-Client ipsec-m2ms: port-s '\"5064\"' is not a decimal number"),
    (M2MS.replace("spi-s=2222", "spi-s=1111"),
     "Security-Client ipsec-m2ms: spi-c and spi-s must differ (both 1111)"),
    (M2MS.replace("port-s=5064", "port-s=5062"),
     "Security-Client ipsec-m2ms: port-c and port-s must differ (both 5062)"),
    (M2MS + ";SPI-C=3333", "Security-Client ipsec-m2ms: duplicate parameter 'spi-c'"),
    ("tls;q=0.2;Q=0.3", "Security-Client tls: duplicate parameter 'q'"),
    ("tls;q=1.5", "Security-Client tls: q '1.5' is not a qvalue (0..1, 3 decimals)"),
    ("tls;q=0.1234", "Security-Client tls: q '0.1234' is not a qvalue (0..1, 3 decimals)"),
    ("tls;q", "Security-Client tls: q None is not a qvalue (0..1, 3 decimals)"),
    ("ipsec-3gpp;spi-c=1;spi-s=2;port-c=3;port-s=4",
     "Security-Client ipsec-3gpp: spi-c 1 out of range (256..4294967295)"),
    ("ipsec-m2ms;;alg=x", "invalid Security-Client parameter at ';;alg=x'"),
    ("ipsec-m2ms garbage", "invalid Security-Client parameter at ' garbage'"),
    ("@@@", "Security-Client: invalid mechanism name at '@@@'"),
    ("", "Security-Client: empty mechanism"),
])
def test_malformed_mechanisms_raise_precise_value_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SecurityMechanism.parse(text)
    assert str(err.value) == message


def test_empty_list_elements_and_headers_are_errors() -> None:
    with pytest.raises(ValueError, match="^Security-Server: empty mechanism$"):
        parse_mechanisms(["tls, , digest"], "Security-Server")
    with pytest.raises(ValueError, match="^Security-Verify: no mechanism$"):
        parse_mechanisms([], "Security-Verify")


def test_well_formed_but_unsupported_values_are_not_parse_errors() -> None:
    m = SecurityMechanism.parse(M2MS.replace("hmac-sha-256-128", "hmac-md5-96"))
    assert m.unsupported_reason() == "alg 'hmac-md5-96' not supported"
    m = SecurityMechanism.parse(M2MS.replace("aes-cbc", "des-ede3-cbc"))
    assert m.unsupported_reason() == "ealg 'des-ede3-cbc' not supported"
    m = SecurityMechanism.parse(M2MS.replace("prot=esp", "prot=ah"))
    assert m.unsupported_reason() == "prot 'ah' not supported (esp only)"
    m = SecurityMechanism.parse(M2MS.replace("mod=trans", "mod=tun"))
    assert m.unsupported_reason() == "mod 'tun' not supported (trans only)"
    assert SecurityMechanism.parse("tls").unsupported_reason() == "mechanism 'tls' not supported"


def test_prot_and_mod_default_to_esp_and_trans() -> None:
    m = SecurityMechanism.parse(M2MS.replace(";prot=esp;mod=trans", ""))
    assert (m.prot, m.mod) == ("esp", "trans")
    assert m.unsupported_reason() is None


# ---- negotiation → 494 ----------------------------------------------------------------------

def _m(alg: str, ealg: str, q: str | None = None) -> SecurityMechanism:
    return SecurityMechanism.ipsec(alg, ealg, 1111, 2222, 5062, 5064, q=q)


def test_server_order_decides_between_equal_q() -> None:
    offered = [_m("hmac-sha-1-96", "null"), _m("hmac-sha-1-96", "aes-cbc"),
               _m("hmac-sha-256-128", "aes-cbc")]
    assert choose_mechanism(offered) is offered[2]
    prefs = [Suite("hmac-sha-1-96", "aes-cbc"), Suite("hmac-sha-256-128", "aes-cbc")]
    assert choose_mechanism(offered, prefs) is offered[1]


def test_highest_q_wins_over_server_order() -> None:
    offered = [_m("hmac-sha-256-128", "aes-cbc", "0.1"), _m("hmac-sha-1-96", "null", "0.9")]
    assert choose_mechanism(offered) is offered[1]
    # absent q counts as 1
    offered = [_m("hmac-sha-1-96", "null", "0.999"), _m("hmac-sha-1-96", "aes-cbc")]
    assert choose_mechanism(offered) is offered[1]


def test_unsupported_entries_are_skipped() -> None:
    offered = parse_mechanisms(["ipsec-3gpp;alg=hmac-sha-1-96;spi-c=1111;spi-s=2222;port-c=5062;port-s=5064",
                                M2MS.replace("hmac-sha-256-128", "hmac-md5-96"),
                                "tls", M2MS.replace("aes-cbc", "null")])
    assert choose_mechanism(offered) is offered[3]


def test_nothing_acceptable_is_a_494() -> None:
    offered = parse_mechanisms(["tls", M2MS.replace("hmac-sha-256-128", "hmac-md5-96")])
    with pytest.raises(SecAgreeError) as err:
        choose_mechanism(offered)
    assert err.value.status == 494
    assert err.value.reason == "Security Agreement Required"
    assert str(err.value) == "no acceptable security mechanism offered (ipsec-m2ms, tls)"
    assert not isinstance(err.value, ValueError)


def test_offer_lists_every_suite_with_the_same_spis_and_ports() -> None:
    mechs = offer(1111, 2222, 5062, 5064, q=["1", "0.8", "0.5", "0.2"])
    assert [(m.alg, m.ealg, str(m.q)) for m in mechs] == [
        (s.alg, s.ealg, q) for s, q in zip(DEFAULT_SUITES, ["1", "0.8", "0.5", "0.2"], strict=True)]
    assert {(m.spi_c, m.spi_s, m.port_c, m.port_s) for m in mechs} == {(1111, 2222, 5062, 5064)}
    with pytest.raises(ValueError, match="^2 q values for 4 suites$"):
        offer(1111, 2222, 5062, 5064, q=["1", "0.5"])


# ---- Security-Verify (downgrade protection) --------------------------------------------------

SERVER = [SecurityMechanism.ipsec("hmac-sha-256-128", "aes-cbc", 3333, 4444, 5066, 5068)]


def test_verify_ignores_case_whitespace_and_parameter_order() -> None:
    verify_header_values([str(SERVER[0])], SERVER)
    verify_header_values(["IPSEC-M2MS ;port-s=5068; port-c=5066;spi-s=4444 ;spi-c=3333;"
                          "MOD=TRANS;prot=ESP;ealg=AES-CBC;alg=HMAC-SHA-256-128"], SERVER)
    verify_header_values(["ipsec-m2ms;alg=hmac-sha-256-128;ealg=aes-cbc;prot=esp;mod=trans;"
                          "spi-c=03333;spi-s=4444;port-c=5066;port-s=5068"], SERVER)


def test_verify_with_q_values_normalises_them() -> None:
    sent = parse_mechanisms(["tls;q=0.2", "ipsec-ike;q=0.100"], "Security-Server")
    verify_header_values(["ipsec-ike;q=0.1, tls;q=0.20"], sent)


def test_downgrade_is_a_distinct_error() -> None:
    weaker = "ipsec-m2ms;alg=hmac-sha-1-96;ealg=null;prot=esp;mod=trans;spi-c=3333;spi-s=4444;port-c=5066;port-s=5068"
    with pytest.raises(SecurityVerifyMismatch) as err:
        verify_header_values([weaker], SERVER)
    assert str(err.value) == (
        "Security-Verify does not match the Security-Server sent: "
        f"missing {SERVER[0]}; unexpected {weaker}")
    assert isinstance(err.value, SecAgreeError) and err.value.status == 494


@pytest.mark.parametrize("values", [
    [str(SERVER[0]) + ";x=1"],                       # extra parameter
    [str(SERVER[0]).replace(";mod=trans", "")],      # parameter dropped
    [str(SERVER[0]).replace("5068", "5069")],        # value changed
    [str(SERVER[0]), "tls"],                         # extra mechanism
    [str(SERVER[0]), str(SERVER[0])],                # duplicated
])
def test_any_difference_is_a_mismatch(values: list[str]) -> None:
    with pytest.raises(SecurityVerifyMismatch):
        verify_header_values(values, SERVER)


def test_missing_verify_header_is_a_mismatch() -> None:
    with pytest.raises(SecurityVerifyMismatch, match="^Security-Verify missing from the protected request$"):
        verify_header_values([], SERVER)


def test_malformed_verify_is_a_value_error_not_a_mismatch() -> None:
    with pytest.raises(ValueError, match="^Security-Verify ipsec-m2ms: spi-c 1 out of range"):
        verify_header_values([str(SERVER[0]).replace("3333", "1")], SERVER)


def test_verify_security_verify_on_typed_lists() -> None:
    verify_security_verify(list(SERVER), SERVER)
    with pytest.raises(SecurityVerifyMismatch, match="2 mechanisms where 1 were sent"):
        verify_security_verify(SERVER + SERVER, SERVER)
