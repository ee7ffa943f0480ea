"""The runners' terminal: stop signals and an output that may vanish mid-run.

A run must tear its lab down and keep its results however it is stopped: Ctrl-C, `kill`, a
closed terminal or a dropped SSH session (SIGHUP), or Ctrl-C on `make experiment | tee log`,
which kills `tee` too, so that every later print would raise BrokenPipeError and abort the
teardown half-way. `guard()` turns SIGTERM and SIGHUP into KeyboardInterrupt, like SIGINT,
and makes stdout and stderr swallow write errors: the run goes on silently, and its folder
still gets everything.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any, TextIO

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Tolerant:
    """A text stream that stops writing, without an error, once its terminal or pipe has
    gone (OSError: EIO, EPIPE)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self._stream.write(text)
            except OSError:
                self.gone = True
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except OSError:
                self.gone = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def stop_signal(exc: KeyboardInterrupt) -> str:
    """The signal behind a KeyboardInterrupt: `guard()`'s handler raises it with the name of
    SIGTERM or SIGHUP; Python's own SIGINT handler raises it bare."""
    text = str(exc.args[0]) if exc.args else ""
    return text.removeprefix("signal ") if text.startswith("signal SIG") else "SIGINT"


def guard() -> None:
    """Call once at the start of a runner's main() (main thread)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    if not isinstance(sys.stdout, _Tolerant):
        sys.stdout = _Tolerant(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, _Tolerant):
        sys.stderr = _Tolerant(sys.stderr)  # type: ignore[assignment]
