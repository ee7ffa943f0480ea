"""LinkMonitor on real interfaces: inside a network namespace (as a terminal in a Mininet
host runs) and in-process; carrier loss by setting the veth peer down, removal."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes.linkmon import LinkMonitor

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)"),
]

REPO = Path(__file__).resolve().parents[2]
TAG = os.getpid() % 100000


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def wait_for(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def veth_in_netns() -> Iterator[tuple[str, str, str]]:
    """(namespace, our end inside it, peer end in the root namespace), both up."""
    ns, ours, peer = f"smiglm{TAG}", f"smiglm{TAG}a", f"smiglm{TAG}b"
    ip("netns", "add", ns)
    try:
        ip("link", "add", ours, "type", "veth", "peer", "name", peer)
        ip("link", "set", ours, "netns", ns)
        ip("-n", ns, "link", "set", ours, "up")
        ip("link", "set", peer, "up")
        wait_for(lambda: "LOWER_UP" in ip("-n", ns, "link", "show", ours), "carrier")
        yield ns, ours, peer
    finally:
        subprocess.run(["ip", "link", "del", peer], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)


class Monitor:
    """`python -m nodes.linkmon` run inside a namespace; its JSON lines in a queue."""

    def __init__(self, ns: str, ifname: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "nodes.linkmon", ifname],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, limit: float = 10.0) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=limit)
        except queue.Empty:
            raise AssertionError(f"no event from the monitor (rc={self.proc.poll()})") from None

    def carrier(self) -> bool:
        event = self.next()
        assert self.proc.poll() is None
        return bool(event["carrier"])

    def stop(self) -> tuple[int, list[dict[str, Any]], str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return self.proc.returncode, rest, err


def test_monitor_inside_namespace_reports_each_transition_once(
        veth_in_netns: tuple[str, str, str]) -> None:
    ns, ours, peer = veth_in_netns
    mon = Monitor(ns, ours)
    try:
        initial = mon.next()
        assert (initial["ifname"], initial["carrier"]) == (ours, True)
        assert mon.next() == {"ready": True}
        for mtu in ("1400", "1300"):
            before = time.time_ns()
            ip("link", "set", peer, "down")
            event = mon.next()
            assert (event["ifname"], event["carrier"]) == (ours, False)
            assert event["t_ns"] >= before  # read after the injection, on the wall clock
            # NEWLINKs that change no carrier: reported nothing (the next event is the gain)
            ip("-n", ns, "link", "set", ours, "mtu", mtu)
            ip("-n", ns, "link", "set", ours, "alias", f"smig-test-{mtu}")
            ip("link", "set", peer, "up")
            assert mon.carrier() is True
            ip("-n", ns, "link", "set", ours, "promisc", "on")
            ip("-n", ns, "link", "set", ours, "promisc", "off")
        # the interface disappears (deleting the peer deletes both ends): a loss, no crash
        ip("link", "del", peer)
        assert mon.carrier() is False
        assert mon.proc.poll() is None
    finally:
        rc, rest, err = mon.stop()
    assert rc == 0, err
    assert rest == []  # nothing after: one event per transition
    assert "Traceback" not in err


def test_monitor_in_process_with_async_callback_and_absent_interface() -> None:
    """The asyncio API directly (root namespace, our own veth pair): an interface that does
    not exist yet is reported down, then up when it appears; stop() is idempotent."""
    ours, peer = f"smiglm{TAG}c", f"smiglm{TAG}d"
    seen: list[tuple[str, bool]] = []

    async def on_change(ifname: str, carrier: bool, t_ns: int) -> None:
        assert t_ns > 0
        seen.append((ifname, carrier))

    async def until(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(seen) < n:
            assert time.monotonic() < deadline, f"expected {n} events, got {seen}"
            await asyncio.sleep(0.01)

    async def run() -> None:
        mon = LinkMonitor([ours], on_change)
        await mon.start()
        try:
            await until(1)
            assert mon.state == {ours: None} and not mon.carrier(ours)
            ip("link", "add", ours, "type", "veth", "peer", "name", peer)
            ip("link", "set", ours, "up")
            ip("link", "set", peer, "up")
            await until(2)
            assert mon.carrier(ours)
            ip("link", "set", ours, "down")  # our own side administratively down: loss too
            await until(3)
        finally:
            await mon.stop()
            await mon.stop()

    try:
        asyncio.run(run())
    finally:
        subprocess.run(["ip", "link", "del", ours], capture_output=True, check=False)
    assert seen == [(ours, False), (ours, True), (ours, False)]
