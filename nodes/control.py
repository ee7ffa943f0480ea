"""Local control interface of a node: JSON lines over a Unix socket.

A Unix socket lives in the file system, so the runner (root namespace) reaches a node inside
a Mininet host by path. One request per line, one reply per line::

    → {"cmd": "call", "to": "sip:b1@m2m.example"}
    ← {"ok": true, "result": {"call_id": "..."}}
    ← {"ok": false, "error": "unknown command 'cal' (known: call, hangup, ...)"}

Commands declare their parameters and types; anything else (bad JSON, unknown command,
missing or extra or mistyped parameters, a handler that raises) gets an error reply and is
logged once: the node keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nodes.cli import StartupError, control_path_problem
from nodes.jsonin import loads

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]
MAX_LINE = 64 * 1024


class CommandError(Exception):
    """Raised by a handler for a refusal the caller should see verbatim."""


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    required: dict[str, type | tuple[type, ...]]
    optional: dict[str, type | tuple[type, ...]]
    help: str


def _type_name(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


class ControlServer:
    def __init__(self, path: str, node: str) -> None:
        self.path = path
        self.node = node
        self.commands: dict[str, Command] = {}
        self._server: asyncio.AbstractServer | None = None
        self.command("help", self._help, help="list the commands")

    def command(
        self,
        name: str,
        handler: Handler,
        required: dict[str, type | tuple[type, ...]] | None = None,
        optional: dict[str, type | tuple[type, ...]] | None = None,
        help: str = "",
    ) -> None:
        self.commands[name] = Command(name, handler, required or {}, optional or {}, help)

    async def _help(self) -> dict[str, Any]:
        return {
            c.name: {
                "help": c.help,
                "required": {k: _type_name(t) for k, t in c.required.items()},
                "optional": {k: _type_name(t) for k, t in c.optional.items()},
            }
            for c in self.commands.values()
        }

    async def start(self) -> None:
        """Listen on the socket path (a stale socket there is replaced); StartupError with
        one line if the path cannot be used."""
        problem = control_path_problem(self.path)
        if problem:
            raise StartupError(f"control socket {self.path}: {problem}")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        try:
            self._server = await asyncio.start_unix_server(self._client, self.path,
                                                           limit=MAX_LINE)
            os.chmod(self.path, 0o600)
        except OSError as exc:
            raise StartupError(f"control socket {self.path}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        """Stop listening and remove the socket (only one this server made)."""
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False,
                                               "error": f"request longer than {MAX_LINE} bytes"})
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                await self._reply(writer, await self.dispatch(line))
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        await writer.drain()

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        """Run one request line; every failure becomes {"ok": false, "error": ...}."""
        try:
            request = loads(line, "request")
        except ValueError as exc:
            return self._error(str(exc))
        if not isinstance(request, dict):
            return self._error("request must be a JSON object")
        name = request.pop("cmd", None)
        if not isinstance(name, str):
            return self._error("request needs a string 'cmd'")
        cmd = self.commands.get(name)
        if cmd is None:
            return self._error(f"unknown command {name!r} (known: {', '.join(self.commands)})")
        problem = self._check_args(cmd, request)
        if problem:
            return self._error(f"{name}: {problem}")
        try:
            result = await cmd.handler(**request)
        except CommandError as exc:
            return self._error(f"{name}: {exc}")
        except Exception as exc:  # a bug must not take the node down; say what happened
            log.exception("control command %s failed", name)
            return self._error(f"{name}: internal error: {exc!r}")
        return {"ok": True, "result": result}

    @staticmethod
    def _check_args(cmd: Command, args: dict[str, Any]) -> str | None:
        missing = [k for k in cmd.required if k not in args]
        if missing:
            return f"missing parameter(s): {', '.join(missing)}"
        known = cmd.required | cmd.optional
        extra = [k for k in args if k not in known]
        if extra:
            return f"unknown parameter(s): {', '.join(extra)}"
        for key, value in args.items():
            want = known[key]
            wanted = want if isinstance(want, tuple) else (want,)
            if isinstance(value, bool) and bool not in wanted:
                return f"parameter {key!r} must be {_type_name(want)}, got bool"
            if not isinstance(value, want):
                return f"parameter {key!r} must be {_type_name(want)}, got {type(value).__name__}"
        return None

    def _error(self, message: str) -> dict[str, Any]:
        log.warning("control: %s", message)
        return {"ok": False, "error": message}


async def until_stopped() -> None:
    """Block until the node gets SIGTERM or SIGINT (what the runner sends at teardown)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
