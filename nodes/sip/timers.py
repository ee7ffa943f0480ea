"""RFC 3261 §17 timer values and a start/cancel/expired timer on the asyncio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TimerConfig:
    """T1/T2/T4 (RFC 3261 table 4). The lab uses a short T1 (e.g. 0.05 s)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_d: float = 32.0  # >= 32 s over UDP; tests shorten it

    @property
    def b(self) -> float:
        return 64 * self.t1

    f = h = j = l = m = b  # all 64*T1  # noqa: E741

    @property
    def d(self) -> float:
        return self.timer_d

    @property
    def i(self) -> float:
        return self.t4

    @property
    def k(self) -> float:
        return self.t4

    @classmethod
    def lab(cls, t1: float = 0.05) -> TimerConfig:
        """Scaled timers: T2 = 8*T1, T4 = 10*T1, Timer D = 64*T1."""
        return cls(t1=t1, t2=8 * t1, t4=10 * t1, timer_d=64 * t1)


class Timer:
    """One named timer. start() (re)arms it, cancel() disarms it; when it fires it is
    marked expired and calls the owner's callback with the timer."""

    __slots__ = ("_callback", "_handle", "expired", "interval", "name")

    def __init__(self, name: str, callback: Callable[[Timer], None]) -> None:
        self.name = name
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.expired = False
        self.interval = 0.0

    def start(self, interval: float) -> None:
        self.cancel()
        self.interval = interval
        self.expired = False
        self._handle = asyncio.get_running_loop().call_later(interval, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def _fire(self) -> None:
        self._handle = None
        self.expired = True
        self._callback(self)

    def __repr__(self) -> str:
        return f"Timer({self.name}, running={self.running}, expired={self.expired})"
