"""Control commands with bad arguments: a clear CommandError (the control socket's
`{"ok": false, "error": ...}`), no traceback, and the terminal's state as it was."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nodes.control import CommandError
from tests.smig.harness import Net, run


@pytest.mark.parametrize("to, error", [
    ("sip:", "bad SIP URI: malformed SIP URI"),
    ("sip:x y@z", "bad SIP URI: whitespace"),
    ("sip:b1@m2m.example;lr\r\nX: y", "bad SIP URI: invalid URI parameter"),
    ("sip:b1@m2m.example?Subject=hi", "cannot be a Request-URI"),
    ("tel:+1234", "unknown terminal"),
    ("zz", "unknown terminal"),
])
def test_call_to_a_bad_target(tmp_path: Path, to: str, error: str) -> None:
    async def scenario(net: Net) -> None:
        a1 = await net.terminal("a1")
        with pytest.raises(CommandError, match=error):
            await a1.call(to)
        with pytest.raises(CommandError, match=error):
            await a1.message(to, "hello")
        assert a1.calls == {} and a1.media == {}

    run(scenario, tmp_path)


def test_call_and_message_argument_checks(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        a1 = await net.terminal("a1")
        with pytest.raises(CommandError, match="unknown media 'smell'"):
            await a1.call("b1", media="smell")
        with pytest.raises(CommandError, match="a1 does not do video"):
            await a1.call("b1", media="video")
        with pytest.raises(CommandError, match="text too long"):
            await a1.message("b1", "A" * 70000)
        assert a1.calls == {} and a1.media == {}

    run(scenario, tmp_path)


def test_switch_with_key_reuse_in_open_mode(tmp_path: Path) -> None:
    """There are no keys to reuse without IPsec: it was an AssertionError."""
    async def scenario(net: Net) -> None:
        a1, b1 = await net.terminal("a1"), await net.terminal("b1")
        cid = (await a1.call("b1"))["call_id"]
        with pytest.raises(CommandError, match="no media keys to reuse .* renegotiate"):
            await a1.smig.switch(cid, "a2", "video", "reuse")
        with pytest.raises(CommandError, match="method 'teleport' not one of"):
            await a1.smig.switch(cid, "a2", "video", "teleport")
        with pytest.raises(CommandError, match="media 'smell' not one of"):
            await a1.smig.switch(cid, "a2", "smell", "renegotiate")
        with pytest.raises(CommandError, match="no secure call"):
            a1.smig.export(cid)
        with pytest.raises(CommandError, match="empty session"):
            await a1.smig.end("")
        assert a1.smig._switches == {} and cid in a1.calls and cid in a1.media
        assert b1.counters.get("rx-MESSAGE", 0) == 0

    run(scenario, tmp_path)


@pytest.mark.parametrize("timeout", [-1, 0, math.inf, math.nan, 1e308, True])
def test_auto_switch_bad_media_timeout_changes_nothing(tmp_path: Path, timeout: float) -> None:
    """media_timeout=-1 used to leave auto_method set and the link monitor running with no
    watchdog, so a correct retry never armed the media-timeout trigger."""
    async def scenario(net: Net) -> None:
        a1 = await net.terminal("a1", interfaces={"a1-wlan": net.ip(21),
                                                  "a1-lte": net.ip(31)})
        ls = a1.linkswitch
        with pytest.raises(CommandError, match=r"media_timeout must be a number of seconds"):
            await ls.set_auto("proposed", timeout)
        assert (ls.auto_method, ls.linkmon, ls.watchdog) == (None, None, None)
        assert await ls.set_auto("proposed", 0.3) == {"auto_switch": "proposed",
                                                      "media_timeout": 0.3}
        assert ls.watchdog is not None and ls.linkmon is not None
        watchdog = ls.watchdog
        with pytest.raises(CommandError):  # armed: a bad value changes nothing either
            await ls.set_auto("reinvite", timeout)
        assert ls.auto_method == "proposed" and ls.watchdog is watchdog
        assert (await ls.set_auto("reinvite", 0.5))["media_timeout"] == 0.5
        assert ls.auto_method == "reinvite" and ls.watchdog is not watchdog
        assert (await ls.set_auto("off"))["auto_switch"] == "off"

    run(scenario, tmp_path)
