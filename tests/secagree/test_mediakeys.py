# ruff: noqa: E501 - attribute vectors read better unwrapped
"""a=m2m-key: parse/serialize, errors, derivation KAT, offerer/answerer SA consistency."""

from __future__ import annotations

import base64

import pytest

from nodes.ipsec.api import Direction, SecurityAssociation, Selector
from nodes.mediakeys import (
    M2mKey,
    Role,
    derive_media_keys,
    media_key,
    media_sas,
    set_media_key,
)
from nodes.sip.sdp import SessionDescription
from tests.secagree.hkdf_ref import hkdf_by_hand

pytestmark = pytest.mark.timeout(10)

N_OFFER = bytes(range(16))
N_ANSWER = bytes(range(100, 116))
B64_OFFER = base64.b64encode(N_OFFER).decode()  # AAECAwQFBgcICQoLDA0ODw==
OFFER = M2mKey(N_OFFER, 0x1001)
ANSWER = M2mKey(N_ANSWER, 0x2002)
CALL_ID = "call-1@10.0.1.10"
A1, B1 = "10.0.1.10", "10.0.3.10"


def test_serialize_and_parse() -> None:
    text = f"{B64_OFFER};spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128"
    assert OFFER.serialize() == text
    parsed = M2mKey.parse(text)
    assert parsed == OFFER
    assert (parsed.nonce, parsed.spi, parsed.ealg, parsed.alg) == (
        N_OFFER, 4097, "aes-cbc", "hmac-sha-256-128")


@pytest.mark.parametrize("text", [
    f"{B64_OFFER};spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128",
    f"{B64_OFFER};alg=hmac-sha-1-96;spi=0004097;ealg=null",
    f"{B64_OFFER};spi=4294967295;ealg=aes-cbc;alg=hmac-sha-256-128",
])
def test_round_trip_is_byte_exact(text: str) -> None:
    assert M2mKey.parse(text).serialize() == text


@pytest.mark.parametrize(("text", "message"), [
    ("", "m2m-key: empty value"),
    ("not*base64;spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128", "m2m-key: nonce is not valid base64"),
    ("AAECAwQFBgcICQoLDA0ODw;spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: nonce is not valid base64"),
    ("AAECAwQFBgcICQoL;spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: nonce is 12 bytes, must be 16"),
    ("AAECAwQFBgcICQoLDA0ODxA=;spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: nonce is 17 bytes, must be 16"),
    ("AAECAwQFBgcICQoLDA0ODx==;spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: nonce is not canonical base64"),
    ("AAECAwQFBgcICQoLDA0ODwé=;spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: nonce is not valid base64"),
    (f"{B64_OFFER};spi=255;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: spi 255 out of range (256..4294967295)"),
    (f"{B64_OFFER};spi=4294967296;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: spi 4294967296 out of range (256..4294967295)"),
    (f"{B64_OFFER};spi=99999999999999;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: spi 999999999999... out of range (256..4294967295)"),
    (f"{B64_OFFER};spi=0x1001;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: spi '0x1001' is not a decimal number"),
    (f"{B64_OFFER};spi=4097;ealg=aes-cbc;alg=hmac-md5-96", "m2m-key: unknown alg 'hmac-md5-96'"),
    (f"{B64_OFFER};spi=4097;ealg=des;alg=hmac-sha-256-128", "m2m-key: unknown ealg 'des'"),
    (f"{B64_OFFER};spi=4097;ealg=aes-cbc", "m2m-key: missing parameter 'alg'"),
    (f"{B64_OFFER};spi=4097;spi=4098;ealg=aes-cbc;alg=hmac-sha-256-128",
     "m2m-key: duplicate parameter 'spi'"),
    (f"{B64_OFFER};spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128;x=1",
     "m2m-key: unknown parameter 'x'"),
    (f"{B64_OFFER};spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128;", "m2m-key: malformed parameter ''"),
    (f"{B64_OFFER}; spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128", "m2m-key: unknown parameter ' spi'"),
    (f"{B64_OFFER};spi;ealg=aes-cbc;alg=hmac-sha-256-128", "m2m-key: malformed parameter 'spi'"),
])
def test_malformed_values(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        M2mKey.parse(text)
    assert str(err.value) == message


def test_nonce_never_in_repr_or_errors() -> None:
    assert B64_OFFER not in repr(OFFER) and N_OFFER.hex() not in repr(OFFER)
    assert repr(OFFER) == "M2mKey(spi=4097, aes-cbc/hmac-sha-256-128, nonce=<hidden>)"
    secret = "AAECAwQFBgcICQoL"  # a 12-byte nonce, rejected without being echoed
    with pytest.raises(ValueError) as err:
        M2mKey.parse(f"{secret};spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128")
    assert secret not in str(err.value)


def test_derivation_known_answer() -> None:
    okm = hkdf_by_hand(N_OFFER + N_ANSWER, CALL_ID.encode(), b"m2m-media\x01", 96)
    keys = derive_media_keys(OFFER, ANSWER, CALL_ID, 1)
    assert keys.offer_to_answer.enc_key == okm[0:16]
    assert keys.offer_to_answer.auth_key == okm[16:48]
    assert keys.answer_to_offer.enc_key == okm[48:64]
    assert keys.answer_to_offer.auth_key == okm[64:96]
    other_line = derive_media_keys(OFFER, ANSWER, CALL_ID, 0)
    assert other_line.offer_to_answer.enc_key != keys.offer_to_answer.enc_key
    other_call = derive_media_keys(OFFER, ANSWER, "call-2@10.0.1.10", 1)
    assert other_call.answer_to_offer.auth_key != keys.answer_to_offer.auth_key


def test_derivation_with_sha1_and_null() -> None:
    o = M2mKey(N_OFFER, 0x1001, "null", "hmac-sha-1-96")
    a = M2mKey(N_ANSWER, 0x2002, "null", "hmac-sha-1-96")
    okm = hkdf_by_hand(N_OFFER + N_ANSWER, CALL_ID.encode(), b"m2m-media\x00", 96)
    keys = derive_media_keys(o, a, CALL_ID, 0)
    assert keys.offer_to_answer.enc_key == b"" and keys.offer_to_answer.auth_key == okm[16:36]
    assert keys.answer_to_offer.auth_key == okm[64:84]


def test_derivation_errors() -> None:
    with pytest.raises(ValueError, match="^m2m-key: answer uses aes-cbc/hmac-sha-1-96, offer "
                                         "aes-cbc/hmac-sha-256-128$"):
        derive_media_keys(OFFER, M2mKey(N_ANSWER, 0x2002, alg="hmac-sha-1-96"), CALL_ID, 0)
    with pytest.raises(ValueError, match="^m2m-key: m-line index 256 out of range"):
        derive_media_keys(OFFER, ANSWER, CALL_ID, 256)
    with pytest.raises(ValueError, match="^m2m-key: empty Call-ID$"):
        derive_media_keys(OFFER, ANSWER, "", 0)


def _sa_key(sa: SecurityAssociation) -> tuple[object, ...]:
    """What both ends of one SA must agree on (the receiver's selector is its own business:
    it takes the peer from any address, for Fig 4)."""
    return (sa.src, sa.dst, sa.spi, sa.enc_alg, sa.enc_key, sa.auth_alg, sa.auth_key)


def test_offerer_and_answerer_install_matching_sas() -> None:
    off = media_sas(Role.OFFERER, OFFER, ANSWER, CALL_ID, 0, A1, 40000, B1, 50000)
    ans = media_sas(Role.ANSWERER, OFFER, ANSWER, CALL_ID, 0, B1, 50000, A1, 40000)
    assert _sa_key(off.outbound) == _sa_key(ans.inbound)
    assert _sa_key(ans.outbound) == _sa_key(off.inbound)
    # each side's spi is the one it receives on
    assert off.inbound.spi == OFFER.spi and off.outbound.spi == ANSWER.spi
    assert ans.inbound.spi == ANSWER.spi and ans.outbound.spi == OFFER.spi
    assert (off.outbound.src, off.outbound.dst) == (A1, B1)
    assert off.outbound.selector == Selector(A1, B1, 17)
    assert off.inbound.selector == Selector("0.0.0.0", A1, 17)  # peer may move (Fig 4)
    keys = derive_media_keys(OFFER, ANSWER, CALL_ID, 0)
    assert off.outbound.enc_key == keys.offer_to_answer.enc_key
    assert ans.outbound.auth_key == keys.answer_to_offer.auth_key
    assert off.outbound.enc_key != ans.outbound.enc_key
    # policies: RTP and RTCP per direction, both on the same SA
    out = [(p.selector.sport, p.selector.dport, p.spi, p.tmpl_src, p.tmpl_dst)
           for p in off.policies if p.direction is Direction.OUT]
    assert out == [(40000, 50000, ANSWER.spi, A1, B1), (40001, 50001, ANSWER.spi, A1, B1)]
    inn = [(p.selector.src, p.selector.sport, p.selector.dport, p.tmpl_src, p.tmpl_dst)
           for p in off.policies if p.direction is Direction.IN]
    assert inn == [(B1, 50000, 40000, B1, A1), (B1, 50001, 40001, B1, A1)]
    # what one side sends out, the other expects in, port for port
    sent = {p.selector for p in off.policies if p.direction is Direction.OUT}
    expected = {p.selector for p in ans.policies if p.direction is Direction.IN}
    assert sent == expected
    assert all(p.selector.proto == 17 for p in off.policies + ans.policies)
    for policy in off.policies:
        sa = off.outbound if policy.direction is Direction.OUT else off.inbound
        assert (policy.tmpl_src, policy.tmpl_dst) == (sa.src, sa.dst)


def test_keys_hidden_in_sa_reprs() -> None:
    off = media_sas(Role.OFFERER, OFFER, ANSWER, CALL_ID, 0, A1, 40000, B1, 50000)
    text = repr(off)
    for sa in off.sas:
        assert sa.enc_key.hex() not in text and sa.auth_key.hex() not in text
    keys = derive_media_keys(OFFER, ANSWER, CALL_ID, 0)
    assert keys.offer_to_answer.enc_key.hex() not in repr(keys)


@pytest.mark.parametrize(("args", "message"), [
    (("10.0.1", 40000, B1, 50000), "local address '10.0.1' is not IPv4"),
    ((A1, 65535, B1, 50000), "local RTP port 65535 out of range (1..65534; RTCP is RTP+1)"),
    ((A1, 40000, B1, 0), "remote RTP port 0 out of range (1..65534; RTCP is RTP+1)"),
])
def test_media_sas_input_errors(args: tuple[str, int, str, int], message: str) -> None:
    with pytest.raises(ValueError) as err:
        media_sas(Role.OFFERER, OFFER, ANSWER, CALL_ID, 0, *args)
    assert str(err.value) == message


def test_fresh_keys_for_rekey() -> None:
    in_use = {OFFER.spi, ANSWER.spi}
    new_o = M2mKey.fresh(in_use)
    new_a = M2mKey.fresh(in_use | {new_o.spi})
    assert new_o.spi not in in_use and new_a.spi not in in_use | {new_o.spi}
    assert new_o.nonce != OFFER.nonce and len(new_o.nonce) == 16
    old = media_sas(Role.OFFERER, OFFER, ANSWER, CALL_ID, 0, A1, 40000, B1, 50000)
    new = media_sas(Role.OFFERER, new_o, new_a, CALL_ID, 0, A1, 40000, B1, 50000)
    assert new.outbound.enc_key != old.outbound.enc_key
    assert new.outbound.spi == new_a.spi
    # same selectors: the new policies replace the old ones
    assert {p.selector for p in new.policies} == {p.selector for p in old.policies}


SDP = (
    "v=0\r\n"
    "o=a1 1 1 IN IP4 10.0.1.10\r\n"
    "s=-\r\n"
    "c=IN IP4 10.0.1.10\r\n"
    "t=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    f"a=m2m-key:{B64_OFFER};spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128\r\n"
    "m=video 40002 RTP/AVP 96\r\n"
    "a=rtpmap:96 H264/90000\r\n")


def test_sdp_attribute_access() -> None:
    sd = SessionDescription.parse(SDP.encode())
    assert media_key(sd.media[0]) == OFFER
    assert media_key(sd.media[1]) is None
    set_media_key(sd.media[1], ANSWER)
    assert media_key(sd.media[1]) == ANSWER
    assert sd.serialize() == (SDP + f"a=m2m-key:{ANSWER}\r\n").encode()
    set_media_key(sd.media[0], ANSWER)
    assert sd.media[0].attributes("m2m-key") == [str(ANSWER)]
    assert SessionDescription.parse(SDP.encode()).serialize() == SDP.encode()


def test_sdp_attribute_errors() -> None:
    twice = SDP.replace("a=rtpmap:0 PCMU/8000\r\n",
                        f"a=rtpmap:0 PCMU/8000\r\na=m2m-key:{ANSWER}\r\n")
    with pytest.raises(ValueError, match="^m2m-key: 2 attributes in one media section$"):
        media_key(SessionDescription.parse(twice.encode()).media[0])
    bare = SDP.replace(f"a=m2m-key:{B64_OFFER};spi=4097;ealg=aes-cbc;alg=hmac-sha-256-128",
                       "a=m2m-key")
    with pytest.raises(ValueError, match="^m2m-key: attribute without a value$"):
        media_key(SessionDescription.parse(bare.encode()).media[0])


def test_media_sas_carry_esp_both_ways() -> None:
    from nodes.ipsec.esp import IntegrityError, SaState

    off = media_sas(Role.OFFERER, OFFER, ANSWER, CALL_ID, 0, A1, 40000, B1, 50000)
    ans = media_sas(Role.ANSWERER, OFFER, ANSWER, CALL_ID, 0, B1, 50000, A1, 40000)
    rtp = b"\x80\x00\x00\x01" + bytes(168)
    at_answerer = SaState(ans.inbound)
    # a third party that saw only the Call-ID and SPIs, not the nonces, cannot forge
    forged = media_sas(Role.OFFERER, M2mKey(bytes(16), OFFER.spi), ANSWER, CALL_ID, 0,
                       A1, 40000, B1, 50000)
    with pytest.raises(IntegrityError):
        at_answerer.receive(SaState(forged.outbound).send(rtp, 17))
    assert at_answerer.receive(SaState(off.outbound).send(rtp, 17)).payload == rtp
    assert SaState(off.inbound).receive(SaState(ans.outbound).send(rtp, 17)).payload == rtp
