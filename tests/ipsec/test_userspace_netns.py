"""UserspaceBackend(netns=NAME) driven from this (root-namespace) process: everything it
creates lives in NAME, bad input leaves it unchanged, close() removes it all."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodes.ipsec.api import Direction, IPsecError, Policy, SecurityAssociation, Selector
from nodes.ipsec.nft import Nft
from nodes.ipsec.spd import nft_ruleset
from nodes.ipsec.userspace import UserspaceBackend

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (scripts/setup.sh)"),
]

A, B = "10.99.43.1", "10.99.43.2"


def run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"smespn{os.getpid() % 100000}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def make_sa(spi: int = 0x1001) -> SecurityAssociation:
    return SecurityAssociation(A, B, spi, "aes-cbc", b"\x01" * 16, "hmac-sha-256-128",
                               b"\x02" * 32)


@pytest.mark.parametrize("in_process", [True, False], ids=["libnftables", "nft-process"])
def test_backend_lives_in_the_given_namespace(netns: str, in_process: bool,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = UserspaceBackend(netns=netns, nft_in_process=in_process)
    try:
        backend.start()
        assert f"({'libnftables' if in_process else 'nft process'})" in caplog.text
        assert backend.tun in run("ip", "-n", netns, "link", "show")
        assert backend.tun not in run("ip", "link", "show")
        assert backend.table in run("ip", "netns", "exec", netns, "nft", "list", "tables")
        assert backend.table not in run("nft", "list", "tables")
        assert f"{backend.mark:#x}" in run("ip", "-n", netns, "rule", "show")

        backend.add_sa(make_sa())
        with pytest.raises(IPsecError, match="already exists"):
            backend.add_sa(make_sa())
        with pytest.raises(ValueError, match="not an IPv4 address"):
            backend.add_sa(SecurityAssociation("a.b", B, 0x1002, "null", b"", "hmac-sha-1-96",
                                               b"k" * 20))
        assert [sa.spi for sa in backend.list_sas()] == [0x1001]
        assert "keys=<hidden>" in repr(backend.get_sa(B, 0x1001))

        good = Policy(Selector(A, B, 17, 5000, 6000), Direction.OUT, A, B)
        backend.add_policy(good)
        rules = run("ip", "netns", "exec", netns, "nft", "list", "table", "ip", backend.table)
        with pytest.raises(ValueError):
            backend.add_policy(Policy(Selector(A, "10.99.43.2 drop", 17), Direction.OUT, A, B))
        with pytest.raises(IPsecError, match="exists"):
            backend.add_policy(good)
        assert backend.list_policies() == [good]
        assert run("ip", "netns", "exec", netns, "nft", "list", "table", "ip",
                   backend.table) == rules
        backend.delete_policy(good.selector, Direction.OUT)
        backend.delete_policy(good.selector, Direction.OUT)  # already gone: not an error
        backend.delete_sa(B, 0x1001)
        backend.delete_sa(B, 0x1001)
        assert backend.counters()["policy_dropped"] == 0
    finally:
        backend.close()
    assert backend.tun not in run("ip", "-n", netns, "link", "show")
    assert backend.table not in run("ip", "netns", "exec", netns, "nft", "list", "tables")
    assert f"{backend.mark:#x}" not in run("ip", "-n", netns, "rule", "show")
    backend.close()  # idempotent
    assert "SA added" in caplog.text
    assert "0101010101" not in caplog.text and "0202020202" not in caplog.text  # no keys


def test_rp_filter_loosened_and_restored(netns: str) -> None:
    path = "/proc/sys/net/ipv4/conf/all/rp_filter"
    run("ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
    with UserspaceBackend(netns=netns):
        assert run("ip", "netns", "exec", netns, "cat", path).strip() == "2"
    assert run("ip", "netns", "exec", netns, "cat", path).strip() == "1"


def test_run_until_signal_cleans_up_on_sigterm(netns: str) -> None:
    code = ("from nodes.ipsec.userspace import UserspaceBackend, run_until_signal\n"
            "b = UserspaceBackend()\n"
            "print(b.tun, b.table, flush=True)\n"
            "raise SystemExit(run_until_signal(b))\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                            cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tun, table = proc.stdout.readline().split()
        deadline = time.monotonic() + 10
        while f"{tun}:" not in run("ip", "-n", netns, "link", "show"):
            assert time.monotonic() < deadline, "TUN never appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert tun not in run("ip", "-n", netns, "link", "show")
    assert table not in run("ip", "netns", "exec", netns, "nft", "list", "tables")
    assert "fwmark" not in run("ip", "-n", netns, "rule", "show")


def test_start_failure_leaves_nothing(netns: str) -> None:
    backend = UserspaceBackend(netns=netns)
    backend.tun = "x" * 20  # too long for a device name: TUNSETIFF fails
    with pytest.raises(OSError):
        backend.start()
    assert backend.table not in run("ip", "netns", "exec", netns, "nft", "list", "tables")
    assert "fwmark" not in run("ip", "-n", netns, "rule", "show")


@pytest.mark.parametrize("in_process", [True, False], ids=["libnftables", "nft-process"])
def test_nft_batches_run_in_the_namespace_and_fail_whole(netns: str, in_process: bool) -> None:
    nft = Nft(netns, in_process=in_process)
    assert nft.mode == ("libnftables" if in_process else "nft process")
    pol = Policy(Selector(A, B, 17, 5000, 6000), Direction.IN, B, A)
    nft.run(nft_ruleset("smig_esp_t1", "smespt1", 7, [pol]))
    try:
        listing = run("ip", "netns", "exec", netns, "nft", "list", "table", "ip", "smig_esp_t1")
        assert "udp sport 5000 udp dport 6000" in listing
        assert "smig_esp_t1" not in run("nft", "list", "tables")  # not in our namespace
        assert nft.counter_packets("smig_esp_t1", "policy_drops") == 0
        # A batch with a bad line changes nothing; the error is nft's own, one line.
        with pytest.raises(IPsecError, match=r"^nft failed: .*Error: syntax error") as err:
            nft.run("flush chain ip smig_esp_t1 in\nadd rule ip smig_esp_t1 in bogus\n")
        assert "\n" not in str(err.value)
        assert run("ip", "netns", "exec", netns, "nft", "list", "table", "ip",
                   "smig_esp_t1") == listing
    finally:
        nft.run("delete table ip smig_esp_t1\n")
    assert nft.counter_packets("smig_esp_t1", "policy_drops") == 0  # gone: 0, no error
