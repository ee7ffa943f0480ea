"""Client side of a node's control socket (see `nodes.control`), and a command line for it:

    python -m experiments.control captures/<run>/ctl/a1.sock call to=b1
    python -m experiments.control captures/<run>/ctl/a1.sock status

Parameters are key=value; a value that reads as JSON (true, 3600, "x", [..]) is taken as
JSON, anything else as a string.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
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
            try:
                sock.connect(self.path)
            except OSError as exc:
                raise ConnectionError(f"{self.path}: {exc.strerror or exc} (is the node "
                                      f"running?)") from None
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


def parse_params(tokens: list[str]) -> dict[str, Any]:
    """['to=b1', 'video=true'] -> {'to': 'b1', 'video': True}; ValueError names a bad one."""
    params: dict[str, Any] = {}
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"expected key=value, got {tok!r}")
        if key in params:
            raise ValueError(f"{key} given twice")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.control", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket", help="the node's control socket (captures/<run>/ctl/NAME.sock)")
    ap.add_argument("cmd", nargs="?", help="command, e.g. status, call, link_switch, help")
    ap.add_argument("params", nargs="*", help="key=value parameters (optional)")
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.error("the following argument is required: cmd (e.g. status; help lists the "
                 "node's commands)")
    try:
        params = parse_params(args.params)
        result = NodeControl(args.socket)(args.cmd, **params)
    except (ValueError, NodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
