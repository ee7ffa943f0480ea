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


def test_backend_lives_in_the_given_namespace(netns: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = UserspaceBackend(netns=netns)
    try:
        backend.start()
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
