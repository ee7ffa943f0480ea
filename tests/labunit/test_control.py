"""The node control interface: documented commands work, bad requests get error replies."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from experiments.control import NodeControl, NodeError
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
    ],
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
