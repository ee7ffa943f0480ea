"""KernelBackend's message building and the backend probe, without kernel ESP.

Pure tests run everywhere; the `lab` ones (root) program XFRM *policies* in a scratch namespace,
which this host's kernel supports even though it has no ESP (SAs are the VM's business).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import netns as pyroute2_netns

from nodes.ipsec import xfrm as X
from nodes.ipsec.api import Direction, IPsecError, Policy, SecurityAssociation, Selector
from nodes.ipsec.kernel import (
    KernelBackend,
    policy_from_message,
    policy_message,
    sa_from_message,
    sa_message,
)
from nodes.ipsec.probe import kernel_has_esp, select_backend

SEL = Selector("10.0.1.10", "10.0.3.10", 17, 5061, 5062)


def make_sa(**kw: object) -> SecurityAssociation:
    args: dict = dict(src="10.0.1.10", dst="10.0.3.10", spi=0x1001, enc_alg="aes-cbc",
                      enc_key=bytes(range(16)), auth_alg="hmac-sha-256-128",
                      auth_key=bytes(range(32)), selector=SEL)  # fmt: skip
    args.update(kw)
    return SecurityAssociation(**args)


def decoded(msg: X.xfrm_msg) -> X.xfrm_msg:
    msg.encode()
    back = type(msg)(msg.data)
    back.decode()
    return back


def test_sa_round_trip_through_the_wire_format() -> None:
    sa = make_sa(lifetime_seconds=300, replay_window=32, seq=41, replay_top=7)
    msg = decoded(sa_message(sa))
    assert msg["lft"]["hard_add_expires_seconds"] == 300
    assert 0 < msg["lft"]["soft_add_expires_seconds"] < 300
    assert msg["lft"]["hard_byte_limit"] == X.XFRM_INF
    assert msg.get_attr("XFRMA_REPLAY_VAL") == {"oseq": 41, "seq": 7, "bitmap": 0xFFFFFFFF}
    back = sa_from_message(msg)
    assert back is not None
    for name in ("src", "dst", "spi", "enc_alg", "enc_key", "auth_alg", "auth_key", "selector",
                 "replay_window", "lifetime_seconds", "seq", "replay_top"):  # fmt: skip
        assert getattr(back, name) == getattr(sa, name), name


def test_sa_without_lifetime_or_state() -> None:
    msg = decoded(sa_message(make_sa(selector=None, enc_alg="null", enc_key=b"",
                                     auth_alg="hmac-sha-1-96", auth_key=bytes(20))))  # fmt: skip
    assert msg["lft"]["hard_add_expires_seconds"] == 0  # XFRM: 0 = never
    assert msg["lft"]["soft_add_expires_seconds"] == 0
    assert msg.get_attr("XFRMA_REPLAY_VAL") is None  # a fresh SA starts at zero
    assert msg.get_attr("XFRMA_ALG_CRYPT")["alg_name"].rstrip(b"\0") == b"ecb(cipher_null)"
    assert msg.get_attr("XFRMA_ALG_AUTH_TRUNC")["alg_trunc_len"] == 96
    back = sa_from_message(msg)
    assert back is not None and back.selector is None and back.lifetime_seconds is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"replay_window": 33}, "replay window"),
        ({"lifetime_seconds": -1}, "negative lifetime"),
        ({"dst": "fd00::1"}, "mixed address families"),
        ({"selector": Selector("10.0.1.10", "10.0.3.10", 17, 70000, 1)}, "out of range"),
        ({"src": "10.0.1"}, "does not appear to be an IPv4 or IPv6 address"),
    ],
)
def test_bad_sa_is_a_value_error(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sa_message(make_sa(**kw))


def test_policy_round_trip() -> None:
    policy = Policy(SEL, Direction.OUT, "10.0.1.10", "10.0.3.10", spi=0x1001, priority=900)
    msg = decoded(policy_message(policy))
    assert msg["sel"]["sport_mask"] == 0xFFFF and msg["sel"]["prefixlen_d"] == 32
    assert policy_from_message(msg) == policy
    anyport = Policy(Selector("10.0.1.10", "10.0.3.10", 17), Direction.IN, "10.0.3.10",
                     "10.0.1.10")  # fmt: skip
    msg = decoded(policy_message(anyport))
    assert msg["sel"]["dport_mask"] == 0 and policy_from_message(msg) == anyport
    with pytest.raises(ValueError, match="template SPI"):
        policy_message(Policy(SEL, Direction.OUT, "10.0.1.10", "10.0.3.10", spi=2**32))


def test_select_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMIG_IPSEC_BACKEND", "userspace")
    assert select_backend() == "userspace"
    assert select_backend("Kernel") == "kernel"  # the argument wins
    monkeypatch.setenv("SMIG_IPSEC_BACKEND", "ipsec-tools")
    with pytest.raises(ValueError, match="unknown IPsec backend"):
        select_backend()
    monkeypatch.delenv("SMIG_IPSEC_BACKEND")
    assert select_backend() == ("kernel" if kernel_has_esp() else "userspace")


@pytest.fixture
def netns() -> Iterator[str]:
    name = "smig-xfrm-test"
    pyroute2_netns.create(name)
    try:
        yield name
    finally:
        pyroute2_netns.remove(name)


@pytest.mark.lab
def test_policies_in_a_namespace(netns: str) -> None:
    out = Policy(SEL, Direction.OUT, "10.0.1.10", "10.0.3.10", spi=0x1001)
    inbound = Policy(Selector("10.0.3.10", "10.0.1.10", 17, 5062, 5061), Direction.IN,
                     "10.0.3.10", "10.0.1.10")  # fmt: skip
    ip = ["ip", "-n", netns, "xfrm", "policy"]
    # a policy someone else installed, which flush()/close() must leave alone
    subprocess.run([*ip, "add", "src", "10.9.9.9/32", "dst", "10.9.9.8/32", "dir", "out",
                    "tmpl", "proto", "esp", "mode", "transport"], check=True)  # fmt: skip
    with KernelBackend(netns) as backend:
        backend.add_policy(out)
        backend.add_policy(inbound)
        with pytest.raises(IPsecError, match="exists"):
            backend.add_policy(out)
        assert {p for p in backend.list_policies() if p.selector.src != "10.9.9.9"} == {
            out, inbound}  # fmt: skip
        text = subprocess.run(ip, capture_output=True, text=True, check=True).stdout
        assert "sport 5061 dport 5062" in text and "spi 0x00001001" in text  # ip xfrm agrees
        backend.delete_policy(out.selector, out.direction)
        backend.delete_policy(out.selector, out.direction)  # gone already: fine
        if not kernel_has_esp():
            with pytest.raises(IPsecError, match="no ESP"):
                backend.add_sa(make_sa())
        counters = backend.counters()
        assert {"integrity_failed", "replay_dropped", "no_sa", "policy_dropped", "packets_in",
                "packets_out"} <= counters.keys()  # fmt: skip
    text = subprocess.run(ip, capture_output=True, text=True, check=True).stdout
    assert "10.9.9.9" in text and "5061" not in text


@pytest.mark.lab
def test_missing_namespace_is_an_error() -> None:
    with pytest.raises(IPsecError, match="no network namespace 'smig-no-such-netns'"):
        KernelBackend("smig-no-such-netns")
    assert "smig-no-such-netns" not in pyroute2_netns.listnetns()  # not created by accident
