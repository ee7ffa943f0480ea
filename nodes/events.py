"""JSON-lines event log of a node: one line per step, wall-clock `t_ns` (DESIGN §2).

Wall clock (CLOCK_REALTIME) because the pcaps use it and all Mininet hosts share one kernel,
hence one clock; timers use the monotonic clock instead. Lines are flushed as written so a
killed node's log is complete up to its last step.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from nodes.cli import StartupError

log = logging.getLogger("events")
# One encoder for every line: json.dumps(default=...) would build a new one per call.
_ENCODER = json.JSONEncoder(default=str)


class EventLog:
    def __init__(self, node: str, path: str | None = None) -> None:
        """Append to `path` (stdout without one); StartupError if it cannot be opened."""
        self.node = node
        try:
            self._stream: IO[str] = open(path, "a") if path else sys.stdout  # noqa: SIM115
        except OSError as exc:
            raise StartupError(f"cannot write the event log {path}: "
                               f"{exc.strerror or exc}") from None
        self._owned = path is not None

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"t_ns": time.time_ns(), "node": self.node, "event": event, **fields}
        self._stream.write(_ENCODER.encode(record) + "\n")
        self._stream.flush()
        return record

    def close(self) -> None:
        if self._owned and not self._stream.closed:
            self._stream.close()
