"""Pure tests: carrier dedupe, message decoding, the media watchdog (fake clock), Trigger."""

from __future__ import annotations

import asyncio
import time

import pytest
from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOWER_UP, IFF_UP, ifinfmsg

from nodes.linkmon import CarrierTracker, Cause, LinkMonitor, MediaTimeout, Trigger, link_change

MS = 1_000_000


def wire(msg_type: int, name: str, flags: int) -> ifinfmsg:
    """An ifinfmsg as it comes off the socket (encoded, then decoded)."""
    msg = ifinfmsg()
    msg["header"]["type"] = msg_type
    msg["flags"] = flags
    msg["attrs"] = [("IFLA_IFNAME", name), ("IFLA_MTU", 1500)]
    msg.encode()
    out = ifinfmsg(msg.data)
    out.decode()
    return out


def test_link_change_reads_lower_up_and_removal() -> None:
    assert link_change(wire(RTM_NEWLINK, "a1-wlan", IFF_UP | IFF_LOWER_UP)) == ("a1-wlan", True)
    assert link_change(wire(RTM_NEWLINK, "a1-wlan", IFF_UP)) == ("a1-wlan", False)
    # admin down without LOWER_UP is a loss even where the carrier bit would stay set
    assert link_change(wire(RTM_NEWLINK, "a1-wlan", 0)) == ("a1-wlan", False)
    assert link_change(wire(RTM_DELLINK, "a1-wlan", IFF_UP | IFF_LOWER_UP)) == ("a1-wlan", None)


def test_tracker_reports_initial_state_then_only_transitions() -> None:
    t = CarrierTracker(["a1-wlan", "a1-lte"])
    assert t.update("a1-wlan", True) is True  # initial
    assert t.update("a1-lte", None) is False  # initial, absent
    assert t.update("a1-wlan", True) is None  # stats / flag change: same carrier
    assert t.update("eth0", False) is None  # not watched
    assert t.update("a1-wlan", False) is False
    assert t.update("a1-wlan", False) is None  # LOWERLAYERDOWN then DOWN: one loss
    assert t.update("a1-wlan", True) is True
    assert t.update("a1-wlan", None) is False  # removed while up: a loss
    assert t.state == {"a1-wlan": None, "a1-lte": None}
    assert t.update("a1-wlan", False) is None  # re-created without carrier: still down
    assert t.update("a1-lte", True) is True  # appears with carrier


def test_monitor_dedupes_and_survives_a_failing_callback() -> None:
    seen: list[tuple[str, bool, int]] = []

    async def on_change(ifname: str, carrier: bool, t_ns: int) -> None:
        seen.append((ifname, carrier, t_ns))
        if len(seen) == 2:
            raise RuntimeError("handler bug")

    async def run() -> None:
        mon = LinkMonitor(["a1-wlan"], on_change)
        for i, flags in enumerate([IFF_UP | IFF_LOWER_UP, IFF_UP | IFF_LOWER_UP, IFF_UP,
                                   0, IFF_UP | IFF_LOWER_UP]):
            name, carrier = link_change(wire(RTM_NEWLINK, "a1-wlan", flags)) or ("", None)
            await mon._update(name, carrier, 1000 + i)

    asyncio.run(run())
    assert seen == [("a1-wlan", True, 1000), ("a1-wlan", False, 1002), ("a1-wlan", True, 1004)]


def test_monitor_rejects_bad_names() -> None:
    for bad in ([], [""], ["x" * 16], [None]):
        with pytest.raises(ValueError, match="interface names"):
            LinkMonitor(bad, lambda *_: None)  # type: ignore[arg-type]


class Fake:
    """A fake path: the test sets the wall clock and the last arrival."""

    def __init__(self) -> None:
        self.now = 10_000 * MS
        self.last: int | None = None
        self.fired: list[Trigger] = []

    def watchdog(self, timeout: float = 0.3) -> MediaTimeout:
        return MediaTimeout(lambda: self.last, self.fired.append, timeout=timeout,
                            path="a1-wlan", clock=lambda: self.now)


def test_watchdog_needs_media_first_then_fires_once_after_timeout() -> None:
    f = Fake()
    wd = f.watchdog()
    f.now += 5000 * MS
    assert wd.check() is None  # no media yet: never fires
    f.last = f.now
    f.now += 300 * MS
    assert wd.check() is None  # exactly the timeout: not yet
    f.now += 1 * MS
    trig = wd.check()
    assert trig is not None and wd.stalled
    assert trig.cause is Cause.MEDIA_TIMEOUT and trig.path == "a1-wlan"
    assert trig.t_ns == f.now and trig.detail["last_arrival_ns"] == f.last
    assert trig.detail["silence_ms"] == 301.0
    for _ in range(5):
        f.now += 100 * MS
        assert wd.check() is None  # once per stall
    assert f.fired == [trig]


def test_watchdog_rearms_when_media_flows_again() -> None:
    f = Fake()
    wd = f.watchdog()
    f.last = f.now
    f.now += 400 * MS
    assert wd.check() is not None
    f.last = f.now  # a packet on the path again
    assert wd.check() is None and not wd.stalled
    f.now += 200 * MS
    assert wd.check() is None
    f.now += 200 * MS
    second = wd.check()
    assert second is not None and second.detail["last_arrival_ns"] == f.last
    assert len(f.fired) == 2


def test_watchdog_rejects_bad_settings() -> None:
    for kwargs in ({"timeout": 0}, {"timeout": -1}, {"timeout": float("nan")},
                   {"timeout": 0.3, "period": 0}, {"timeout": 0.3, "period": 0.5}):
        with pytest.raises(ValueError, match="must be"):
            MediaTimeout(lambda: None, print, **kwargs)  # type: ignore[arg-type]


def test_watchdog_on_the_loop_fires_once_and_rearms() -> None:
    """Real loop timers and the real clock, short timeout; poll with a deadline."""
    fired: list[Trigger] = []

    async def until(cond: object, limit: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + limit
        while not cond():  # type: ignore[operator]
            assert asyncio.get_running_loop().time() < deadline, "condition not reached"
            await asyncio.sleep(0.005)

    async def run() -> None:
        last: list[int | None] = [None]
        wd = MediaTimeout(lambda: last[0], fired.append, timeout=0.05, path="p")
        wd.start()
        try:
            await asyncio.sleep(0.2)
            assert fired == []  # no media yet
            last[0] = time.time_ns()
            await until(lambda: len(fired) == 1)
            assert fired[0].t_ns - fired[0].detail["last_arrival_ns"] > 50 * MS
            await asyncio.sleep(0.2)
            assert len(fired) == 1
            last[0] = time.time_ns()
            await until(lambda: len(fired) == 2)
        finally:
            wd.cancel()

    asyncio.run(run())


def test_trigger_event_and_validation() -> None:
    trig = Trigger("carrier-loss", "a1-wlan", 123, {"carrier": False})  # type: ignore[arg-type]
    assert trig.cause is Cause.CARRIER_LOSS
    assert trig.to_event() == {"event": "trigger", "cause": "carrier-loss", "path": "a1-wlan",
                               "t_ns": 123, "detail": {"carrier": False}}
    assert Trigger(Cause.COMMAND, "a1-lte", 5).to_event()["cause"] == "command"
    with pytest.raises(ValueError, match="unknown trigger cause 'link-flap'"):
        Trigger("link-flap", "a1-wlan", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive int"):
        Trigger(Cause.COMMAND, "a1-wlan", 0)
