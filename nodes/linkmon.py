"""Failure detection for link-interface switches (Fig. 4): what tells a terminal to move.

* `LinkMonitor` — carrier of named interfaces in this process's network namespace, from
  rtnetlink link events (RTNLGRP_LINK), reported once per real transition.
* `MediaTimeout` — a watchdog that fires when media stops arriving on a path (a silent
  blackhole keeps the carrier up, so only the media tells).
* `Trigger` — the record a terminal logs when it decides to switch; its `t_ns` is the end of
  the *detection* part of the handover time (DESIGN §2, Measurements).

    python -m nodes.linkmon a1-wlan a1-lte    # JSON line per carrier change, until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTM_DELLINK, RTMGRP_LINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOWER_UP

from nodes.sip.timers import Timer

log = logging.getLogger("linkmon")

CarrierCallback = Callable[[str, bool, int], Awaitable[None] | None]


# --- trigger records ----------------------------------------------------------------------

class Cause(StrEnum):
    CARRIER_LOSS = "carrier-loss"
    MEDIA_TIMEOUT = "media-timeout"
    COMMAND = "command"


@dataclass(frozen=True)
class Trigger:
    """Why and when a terminal starts a link switch. `path` is an interface name (or any
    label the terminal gives a media path); `t_ns` is wall-clock time of detection."""

    cause: Cause
    path: str
    t_ns: int
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "cause", Cause(self.cause))
        except ValueError:
            raise ValueError(f"unknown trigger cause {self.cause!r}: expected one of "
                             f"{', '.join(c.value for c in Cause)}") from None
        if not isinstance(self.t_ns, int) or self.t_ns <= 0:
            raise ValueError(f"trigger t_ns must be a positive int (ns), got {self.t_ns!r}")

    def to_event(self) -> dict[str, Any]:
        """Fields for `EventLog.emit(**trigger.to_event())` (its `t_ns` replaces the log's)."""
        return {"event": "trigger", "cause": self.cause.value, "path": self.path,
                "t_ns": self.t_ns, "detail": dict(self.detail)}


# --- carrier: dedupe (pure) ---------------------------------------------------------------

def link_change(msg: Any) -> tuple[str, bool | None] | None:
    """(ifname, carrier) from an rtnetlink link message; carrier None = interface gone.

    Carrier is IFF_LOWER_UP: the kernel sets it only when the device is up *and* has carrier,
    so a device set administratively down counts as loss too (IFLA_CARRIER alone stays 1 on
    a down dummy/ifb)."""
    name = msg.get("ifname")
    if not name:
        return None
    if msg["header"]["type"] == RTM_DELLINK:
        return name, None
    return name, bool(msg["flags"] & IFF_LOWER_UP)


class CarrierTracker:
    """Last known state per watched interface: True/False, or None when absent.
    Reported carrier is bool(state); `update` says when that actually changes."""

    def __init__(self, ifnames: Iterable[str]) -> None:
        self.state: dict[str, bool | None] = dict.fromkeys(ifnames)
        self._reported: dict[str, bool] = {}

    def update(self, ifname: str, carrier: bool | None) -> bool | None:
        """Record a state; return the new carrier if it must be reported, else None.
        The first update of each interface is always reported (the initial state)."""
        if ifname not in self.state:
            return None
        if carrier is None and self.state[ifname] is not None:
            log.info("%s: interface gone", ifname)
        self.state[ifname] = carrier
        new = bool(carrier)
        if self._reported.get(ifname) == new:
            return None  # flags, stats, MTU, a second NEWLINK for the same transition...
        self._reported[ifname] = new
        return new


# --- carrier: netlink monitor -------------------------------------------------------------

class LinkMonitor:
    """Calls `on_change(ifname, carrier, t_ns)` (sync or async) for each watched interface:
    once at start with its current carrier (False if absent), then once per transition;
    `t_ns` is the wall-clock time the event was read. Removal reports a loss."""

    def __init__(self, ifnames: Iterable[str], on_change: CarrierCallback) -> None:
        names = list(ifnames)
        if not names or not all(isinstance(n, str) and 0 < len(n) < 16 for n in names):
            raise ValueError(f"expected interface names (1-15 characters), got {names!r}")
        self.tracker = CarrierTracker(names)
        self.on_change = on_change
        self._ipr: AsyncIPRoute | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> dict[str, bool | None]:
        return dict(self.tracker.state)

    def carrier(self, ifname: str) -> bool:
        return bool(self.tracker.state.get(ifname))

    async def start(self) -> None:
        if self._ipr is not None:
            raise RuntimeError("LinkMonitor already started")
        ipr = AsyncIPRoute()
        self._ipr = ipr
        try:
            # subscribe before the dump: a change in between is queued, not lost
            await ipr.bind(groups=RTMGRP_LINK)
            t_ns = time.time_ns()
            present = {}
            async for msg in await ipr.get_links():
                change = link_change(msg)
                if change is not None:
                    present[change[0]] = change[1]
            for name in list(self.tracker.state):
                await self._update(name, present.get(name), t_ns)
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._read(ipr), name="linkmon")

    async def stop(self) -> None:
        task, self._task = self._task, None
        ipr, self._ipr = self._ipr, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if ipr is not None:
            ipr.close()

    async def __aenter__(self) -> LinkMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _read(self, ipr: AsyncIPRoute) -> None:
        # get() with no sequence number yields the broadcast messages of one datagram
        while True:
            count = 0
            try:
                async for msg in ipr.get():
                    count += 1
                    change = link_change(msg)
                    if change is not None:
                        await self._update(*change, time.time_ns())
            except OSError as exc:  # NetlinkError is an OSError
                log.error("link monitor: netlink read failed: %s", exc)
                return
            if count == 0:  # the socket was closed under us
                log.warning("link monitor: netlink socket closed")
                return

    async def _update(self, ifname: str, carrier: bool | None, t_ns: int) -> None:
        new = self.tracker.update(ifname, carrier)
        if new is None:
            return
        log.info("%s: carrier %s", ifname, "up" if new else "down")
        try:
            result = self.on_change(ifname, new, t_ns)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # a broken handler must not stop the detection of the next failure
            log.exception("link monitor: on_change(%s, %s) failed", ifname, new)


# --- media watchdog -----------------------------------------------------------------------

class MediaTimeout:
    """Fires `on_timeout(trigger)` once when `last_arrival()` (wall-clock ns of the newest
    packet on the path, None before the first) is older than `timeout` seconds; re-arms when
    a newer packet arrives. Never fires before media has started.

    Checks run every `period` s (default timeout/10) on a loop timer. Arrival times are
    wall-clock, so `clock` must be the same clock (tests pass a fake one)."""

    def __init__(self, last_arrival: Callable[[], int | None],
                 on_timeout: Callable[[Trigger], object], *, timeout: float = 0.3,
                 path: str = "media", period: float | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 s, got {timeout!r}")
        period = timeout / 10 if period is None else period
        if not 0 < period <= timeout:
            raise ValueError(f"period must be in (0, timeout={timeout}] s, got {period!r}")
        self.last_arrival = last_arrival
        self.on_timeout = on_timeout
        self.timeout = timeout
        self.period = period
        self.path = path
        self.clock = clock
        self.fired_at: int | None = None  # last arrival at the time it fired; None = armed
        self._timer = Timer(f"media-timeout {path}", self._expired)

    @property
    def stalled(self) -> bool:
        return self.fired_at is not None

    def start(self) -> None:
        """Start checking (needs a running loop); restarting keeps the stall state."""
        self._timer.start(self.period)

    def cancel(self) -> None:
        self._timer.cancel()

    def _expired(self, _timer: Timer) -> None:
        self._timer.start(self.period)
        try:
            self.check()
        except Exception:
            log.exception("media watchdog %s: check failed", self.path)

    def check(self) -> Trigger | None:
        """One evaluation; returns the trigger if it fired now."""
        last = self.last_arrival()
        if last is None:
            return None
        if self.fired_at is not None:
            if last <= self.fired_at:
                return None
            log.info("media on %s flows again: watchdog re-armed", self.path)
            self.fired_at = None
        now = self.clock()
        silence = now - last
        if silence <= self.timeout * 1e9:
            return None
        self.fired_at = last
        trigger = Trigger(Cause.MEDIA_TIMEOUT, self.path, now,
                          {"last_arrival_ns": last, "silence_ms": round(silence / 1e6, 3),
                           "timeout_ms": round(self.timeout * 1e3, 3)})
        log.info("no media on %s for %.0f ms: trigger", self.path, silence / 1e6)
        self.on_timeout(trigger)
        return trigger


# --- command line (used by the namespace tests; handy for watching a lab host) ---------------

async def _cli(names: list[str]) -> None:
    def report(ifname: str, carrier: bool, t_ns: int) -> None:
        print(json.dumps({"ifname": ifname, "carrier": carrier, "t_ns": t_ns}), flush=True)

    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    async with LinkMonitor(names, report):
        print(json.dumps({"ready": True}), flush=True)
        await done.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.linkmon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ifnames", nargs="+", metavar="IFNAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        asyncio.run(_cli(args.ifnames))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
