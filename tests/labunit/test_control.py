"""The node control interface: documented commands work, bad requests get error replies."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from experiments.control import NodeControl, NodeError
from nodes.cli import StartupError
from nodes.control import CommandError, ControlServer


def _server(path: str) -> ControlServer:
    server = ControlServer(path, "t")

    async def call(to: str, video: bool = False) -> dict[str, object]:
        if not to.startswith("sip:"):
            raise CommandError(f"not a SIP URI: {to!r}")
        return {"to": to, "video": video}

    async def crash() -> None:
        raise RuntimeError("bug")

    server.command("call", call, required={"to": str}, optional={"video": bool})
    server.command("crash", crash)
    return server


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{nope", "request is not valid JSON"),
        (b"[1]", "request must be a JSON object"),
        (b'{"to": "x"}', "request needs a string 'cmd'"),
        (b'{"cmd": "cal"}', "unknown command 'cal' (known: help, call, crash)"),
        (b'{"cmd": "call"}', "call: missing parameter(s): to"),
        (b'{"cmd": "call", "to": "sip:b1@x", "x": 1}', "call: unknown parameter(s): x"),
        (b'{"cmd": "call", "to": 5}', "call: parameter 'to' must be str, got int"),
        (b'{"cmd": "call", "to": "sip:b", "video": 1}', "parameter 'video' must be bool"),
        (b'{"cmd": "call", "to": "tel:1"}', "call: not a SIP URI: 'tel:1'"),
        (b'{"cmd": "crash"}', "crash: internal error: RuntimeError('bug')"),
        (b"[" * 1000 + b"]" * 1000, "request is not valid JSON: nested deeper than 32 levels"),
        (b'{"cmd": "call", "to": ' + b"[" * 30000 + b"]" * 30000 + b"}",
         "request is not valid JSON: nested deeper than 32 levels"),
        (b'{"cmd": "call", "to": "sip:b", "video": NaN}', "NaN is not a JSON number"),
    ],
    ids=["bad-json", "array", "no-cmd", "unknown", "missing", "extra", "mistyped", "bool",
         "refused", "crash", "nested-1000", "nested-30000", "nan"],
)
def test_bad_requests_get_error_replies(line: bytes, error: str) -> None:
    reply = asyncio.run(_server("/nonexistent").dispatch(line))
    assert reply == {"ok": False, "error": reply["error"]}
    assert error in reply["error"]


def test_round_trip_over_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "node.sock")

    async def scenario() -> None:
        server = _server(path)
        await server.start()
        try:
            ctl = NodeControl(path, timeout=5)
            result = await asyncio.to_thread(ctl, "call", to="sip:b1@m2m.example", video=True)
            assert result == {"to": "sip:b1@m2m.example", "video": True}
            with pytest.raises(NodeError, match="unknown command"):
                await asyncio.to_thread(ctl, "nope")
            raw = await asyncio.to_thread(ctl.raw, b"garbage")
            assert raw["ok"] is False
            helptext = await asyncio.to_thread(ctl, "help")
            assert helptext["call"]["required"] == {"to": "str"}
            # the server is still alive after all that
            assert json.dumps(await asyncio.to_thread(ctl, "call", to="sip:x"))
        finally:
            await server.close()
        assert not Path(path).exists()

    asyncio.run(scenario())


def test_deep_nesting_gets_a_reply_and_the_connection_stays(tmp_path: Path) -> None:
    """It used to kill the connection task (RecursionError, 'Task exception was never
    retrieved') with no reply at all."""
    path = str(tmp_path / "node.sock")

    async def scenario() -> None:
        server = _server(path)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
            writer.write(b"[" * 20000 + b"]" * 20000 + b"\n")
            writer.write(b'{"cmd": "call", "to": "sip:b1@x"}\n')
            first = json.loads(await asyncio.wait_for(reader.readline(), 5))
            second = json.loads(await asyncio.wait_for(reader.readline(), 5))
            writer.close()
            assert first["ok"] is False and "nested deeper" in first["error"]
            assert second == {"ok": True, "result": {"to": "sip:b1@x", "video": False}}
        finally:
            await server.close()

    asyncio.run(scenario())


def test_unusable_socket_paths_are_one_line_startup_errors(tmp_path: Path) -> None:
    keep = tmp_path / "config.json"
    keep.write_text("{}")
    cases = [(str(tmp_path / "missing" / "x.sock"), "no directory"),
             (str(tmp_path / ("x" * 120 + ".sock")), "longer than 107 bytes"),
             (str(keep), "exists and is not a socket")]

    async def scenario() -> None:
        for path, error in cases:
            server = _server(path)
            with pytest.raises(StartupError) as err:
                await server.start()
            assert str(err.value).startswith(f"control socket {path}: ")
            assert error in str(err.value)
            await server.close()
        assert keep.read_text() == "{}"  # a file in the way is neither replaced nor removed

    asyncio.run(scenario())


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "node.sock")

    async def scenario() -> None:
        for _ in range(2):  # the second start finds the first one's socket file
            old = _server(path)
            await old.start()
            old._server.close()  # type: ignore[union-attr]  # a node killed before close()
        server = _server(path)
        await server.start()
        assert await asyncio.to_thread(NodeControl(path, timeout=5), "call", to="sip:x") == {
            "to": "sip:x", "video": False}
        await server.close()

    asyncio.run(scenario())
