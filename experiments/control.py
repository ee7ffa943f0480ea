"""Client side of a node's control socket (see `nodes.control`)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class NodeError(RuntimeError):
    """The node refused a command; the message is the node's own."""


class NodeControl:
    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def raw(self, line: bytes) -> dict[str, Any]:
        """Send one raw request line and return the decoded reply (for tests of bad input)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            sock.sendall(line.rstrip(b"\n") + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"{self.path}: node closed the connection")
                buf += chunk
        return json.loads(buf)

    def __call__(self, cmd: str, **args: Any) -> Any:
        reply = self.raw(json.dumps({"cmd": cmd, **args}).encode())
        if not reply.get("ok"):
            raise NodeError(reply.get("error", "unknown error"))
        return reply.get("result")
