"""Registration key derivation (HKDF) and the four sec-agree SAs, from both sides."""

from __future__ import annotations

import random
import struct
from dataclasses import replace

import pytest

from nodes.ipsec.api import Direction, SecurityAssociation, Selector
from nodes.mediakeys import KeyPair, hkdf_sha256, new_spi
from nodes.sip.secagree import (
    Agreement,
    Endpoint,
    SecAgreeError,
    SecurityMechanism,
    Side,
    agreement,
    choose_mechanism,
    derive_registration_keys,
    four_sas,
    offer,
    registration_sas,
)
from tests.secagree.hkdf_ref import hkdf_by_hand

pytestmark = pytest.mark.timeout(10)

PSK = bytes.fromhex("00112233445566778899aabbccddeeff0123456789abcdef")
NONCE = bytes(range(16, 36))
CLIENT = Endpoint("10.0.1.10", spi_c=1111, spi_s=2222, port_c=5062, port_s=5064)
SERVER = Endpoint("10.0.0.10", spi_c=3333, spi_s=4444, port_c=5066, port_s=5068)
AGREED = Agreement("hmac-sha-256-128", "aes-cbc", CLIENT, SERVER)


def test_hkdf_rfc5869_test_case_1() -> None:
    ikm = bytes([0x0B] * 22)
    salt = bytes(range(0x0D))
    info = bytes(range(0xF0, 0xFA))
    okm = hkdf_sha256(ikm, salt, info, 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")
    assert hkdf_by_hand(ikm, salt, info, 42) == okm


def test_registration_keys_known_answer() -> None:
    info = b"ipsec-m2ms" + struct.pack(">IIII", 1111, 2222, 3333, 4444)
    okm = hkdf_by_hand(PSK, NONCE, info, 48)
    keys = derive_registration_keys(PSK, NONCE, AGREED)
    assert keys.enc_key == okm[0:16]
    assert keys.auth_key == okm[16:48]


def test_registration_keys_depend_on_every_input() -> None:
    base = derive_registration_keys(PSK, NONCE, AGREED)
    other_server = Endpoint("10.0.0.10", 3333, 4445, 5066, 5068)
    variants = [
        derive_registration_keys(PSK[:-1] + b"\0", NONCE, AGREED),
        derive_registration_keys(PSK, NONCE[:-1] + b"\0", AGREED),
        derive_registration_keys(PSK, NONCE, Agreement("hmac-sha-256-128", "aes-cbc", CLIENT,
                                                       other_server)),
    ]
    for v in variants:
        assert v.enc_key != base.enc_key and v.auth_key != base.auth_key


def test_key_lengths_follow_the_algorithms() -> None:
    okm = hkdf_by_hand(PSK, NONCE, b"ipsec-m2ms" + struct.pack(">IIII", 1111, 2222, 3333, 4444),
                       48)
    sha1_null = derive_registration_keys(PSK, NONCE, Agreement("hmac-sha-1-96", "null", CLIENT,
                                                               SERVER))
    assert sha1_null.enc_key == b""
    assert sha1_null.auth_key == okm[16:36]


def test_bad_derivation_inputs() -> None:
    with pytest.raises(ValueError, match="^empty PSK$"):
        derive_registration_keys(b"", NONCE, AGREED)
    with pytest.raises(ValueError, match="^nonce of 15 bytes, need at least 16$"):
        derive_registration_keys(PSK, NONCE[:15], AGREED)
    with pytest.raises(ValueError, match="unknown integrity algorithm 'hmac-md5-96'"):
        Agreement("hmac-md5-96", "aes-cbc", CLIENT, SERVER)


def test_keys_never_in_reprs() -> None:
    keys = derive_registration_keys(PSK, NONCE, AGREED)
    sas = registration_sas(AGREED, keys, Side.CLIENT)
    text = repr(keys) + str(keys) + repr(sas) + str(sas)
    for secret in (keys.enc_key, keys.auth_key, PSK):
        assert secret.hex() not in text
        assert secret.hex().upper() not in text
    assert "hidden" in repr(keys)


def test_four_sas_layout_as_design_lists_it() -> None:
    keys = derive_registration_keys(PSK, NONCE, AGREED)
    sas = four_sas(AGREED, keys)
    c, s = CLIENT.ip, SERVER.ip
    assert [(sa.src, sa.selector.sport, sa.dst, sa.selector.dport, sa.spi) for sa in sas] == [
        (c, 5062, s, 5068, 4444),  # client port-c -> server port-s: server's spi-s
        (s, 5068, c, 5062, 1111),  # server port-s -> client port-c: client's spi-c
        (s, 5066, c, 5064, 2222),  # server port-c -> client port-s: client's spi-s
        (c, 5064, s, 5066, 3333),  # client port-s -> server port-c: server's spi-c
    ]
    for sa in sas:
        assert sa.selector == Selector(sa.src, sa.dst, 17, sa.selector.sport, sa.selector.dport)
        assert (sa.enc_alg, sa.auth_alg) == ("aes-cbc", "hmac-sha-256-128")
        assert (sa.enc_key, sa.auth_key) == (keys.enc_key, keys.auth_key)
    # every SPI lives at its receiver: no two inbound SAs of one host share (dst, spi)
    assert len({(sa.dst, sa.spi) for sa in sas}) == 4


def _sa_key(sa: SecurityAssociation) -> tuple[object, ...]:
    return (sa.src, sa.dst, sa.spi, sa.enc_alg, sa.enc_key, sa.auth_alg, sa.auth_key, sa.selector)


def test_both_sides_describe_the_same_four_sas() -> None:
    # each side derives its own keys from what it saw on the wire
    client_keys = derive_registration_keys(PSK, NONCE, AGREED)
    server_keys = derive_registration_keys(bytes(PSK), bytes(NONCE), Agreement(
        "hmac-sha-256-128", "aes-cbc", Endpoint(**vars(CLIENT)), Endpoint(**vars(SERVER))))
    cl = registration_sas(AGREED, client_keys, Side.CLIENT)
    sv = registration_sas(AGREED, server_keys, Side.SERVER)
    assert len(cl.outbound) == len(cl.inbound) == len(sv.outbound) == len(sv.inbound) == 2
    assert [_sa_key(a) for a in cl.outbound] == [_sa_key(a) for a in sv.inbound]
    assert [_sa_key(a) for a in sv.outbound] == [_sa_key(a) for a in cl.inbound]
    assert all(sa.src == CLIENT.ip for sa in cl.outbound)
    assert all(sa.dst == CLIENT.ip for sa in cl.inbound)
    # policies: one per SA, OUT at the sender, IN at the receiver, same selector and template
    for side, sa_set in ((Side.CLIENT, cl), (Side.SERVER, sv)):
        assert len(sa_set.policies) == 4, side
        by_sel = {(p.selector, p.direction): p for p in sa_set.policies}
        for sa in sa_set.outbound:
            p = by_sel[(sa.selector, Direction.OUT)]
            assert (p.tmpl_src, p.tmpl_dst, p.spi) == (sa.src, sa.dst, sa.spi)
        for sa in sa_set.inbound:
            p = by_sel[(sa.selector, Direction.IN)]
            assert (p.tmpl_src, p.tmpl_dst, p.spi) == (sa.src, sa.dst, sa.spi)
    out_c = {(p.selector, p.spi) for p in cl.policies if p.direction is Direction.OUT}
    in_s = {(p.selector, p.spi) for p in sv.policies if p.direction is Direction.IN}
    assert out_c == in_s


def test_wrong_psk_gives_different_keys() -> None:
    right = derive_registration_keys(PSK, NONCE, AGREED)
    wrong = derive_registration_keys(b"wrong psk 16 byt", NONCE, AGREED)
    assert right.auth_key != wrong.auth_key


def test_agreement_from_headers_end_to_end() -> None:
    client_offer = offer(1111, 2222, 5062, 5064)
    chosen = choose_mechanism(client_offer)  # server side
    server_mech = SecurityMechanism.ipsec(chosen.alg or "", chosen.ealg or "", 3333, 4444,
                                          5066, 5068)
    picked = choose_mechanism([server_mech])  # client side, on Security-Server
    agreed = agreement(client_offer, picked, "10.0.1.10", "10.0.0.10")
    assert agreed == AGREED


def test_agreement_needs_a_matching_client_entry() -> None:
    client_offer = offer(1111, 2222, 5062, 5064)[1:]  # no sha-256/aes-cbc
    server_mech = SecurityMechanism.ipsec("hmac-sha-256-128", "aes-cbc", 3333, 4444, 5066, 5068)
    with pytest.raises(SecAgreeError, match="client offered no hmac-sha-256-128/aes-cbc"):
        agreement(client_offer, server_mech, "10.0.1.10", "10.0.0.10")
    tls = SecurityMechanism.parse("tls")
    with pytest.raises(SecAgreeError, match="Security-Server mechanism unusable: mechanism 'tls'"):
        agreement(client_offer, tls, "10.0.1.10", "10.0.0.10")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ip": "proxy"}, "sec-agree endpoint address 'proxy' is not IPv4"),
    ({"spi_c": 255}, "sec-agree spi-c 255 out of range (256..4294967295)"),
    ({"port_s": 70000}, "sec-agree port-s 70000 out of range (1..65535)"),
    ({"spi_s": 1111}, "spi-c and spi-s must differ (both 1111)"),
])
def test_endpoint_validation(kwargs: dict[str, object], message: str) -> None:
    args = {**vars(CLIENT), **kwargs}
    with pytest.raises(ValueError) as err:
        Endpoint(**args)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_new_spi_avoids_spis_in_use() -> None:
    class Scripted(random.Random):
        def __init__(self) -> None:
            super().__init__(1)
            self.values = [1111, 2222, 3333]

        def randint(self, a: int, b: int) -> int:
            return self.values.pop(0)

    assert new_spi({1111, 2222}, Scripted()) == 3333
    for _ in range(200):
        spi = new_spi({256, 257})
        assert 256 <= spi <= 2**32 - 1


def test_keypair_cut_rejects_unknown_algorithms() -> None:
    with pytest.raises(ValueError, match="unknown encryption algorithm 'des'"):
        KeyPair.cut(bytes(16), bytes(32), "des", "hmac-sha-1-96")


@pytest.mark.parametrize(("alg", "ealg"), [("hmac-sha-256-128", "aes-cbc"),
                                           ("hmac-sha-1-96", "null")])
def test_sas_carry_esp_between_the_sides(alg: str, ealg: str) -> None:
    """The client's outbound SAs produce ESP the server's inbound SAs accept (userspace ESP),
    and a wrong PSK fails integrity, as DESIGN §2 expects of the protected REGISTER."""
    from nodes.ipsec.esp import IntegrityError, SaState

    agreed = Agreement(alg, ealg, CLIENT, SERVER)
    cl = registration_sas(agreed, derive_registration_keys(PSK, NONCE, agreed), Side.CLIENT)
    sv = registration_sas(agreed, derive_registration_keys(PSK, NONCE, agreed), Side.SERVER)
    bad = registration_sas(agreed, derive_registration_keys(b"another psk....", NONCE, agreed),
                           Side.CLIENT)
    for out_sa, in_sa, bad_sa in zip(cl.outbound, sv.inbound, bad.outbound, strict=True):
        receiver = SaState(replace(in_sa))  # SaState keeps its runtime state in the SA
        with pytest.raises(IntegrityError):
            receiver.receive(SaState(bad_sa).send(b"x", 17))
        wire = SaState(out_sa).send(b"REGISTER sip:m2m.example SIP/2.0\r\n", 17)
        assert receiver.receive(wire).payload == b"REGISTER sip:m2m.example SIP/2.0\r\n"
