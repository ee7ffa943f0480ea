"""MediaSession takes nothing from the peer unchecked (Fig 2 SDP, Fig 3 keys, Fig 4
addresses, rekey steps): a MediaError says what is wrong, and the session, its sockets and
its SAs stay as they were. A recording IPsec backend shows what is installed."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import pytest

from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.mediakeys import M2mKey, Role
from nodes.mediasession import MediaError, MediaSession, check_media_address, remote_media
from tests.fakeipsec import MemoryBackend
from tests.smig.harness import open_fds

LOCAL, PEER = "127.0.0.2", "127.0.0.3"
EVENTS = EventLog("t", "/dev/null")  # one file for all: the fd counts below stay exact


def offer(c: str = f"c=IN IP4 {PEER}", m: str = "m=audio 40000 RTP/AVP 0",
          key: str | None = None) -> bytes:
    text = f"v=0\r\no=- 1 1 IN IP4 {PEER}\r\ns=x\r\n{c}\r\nt=0 0\r\n{m}\r\n"
    if key is not None:
        text += f"a=m2m-key:{key}\r\n"
    return text.encode()


def in_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Runs an async test body in its own event loop (receivers need a running loop)."""
    @functools.wraps(test)
    def run(*args: object, **kw: object) -> None:
        asyncio.run(test(*args, **kw))
    return run


def session(backend: MemoryBackend | None, role: Role = Role.ANSWERER) -> MediaSession:
    ipsec = NodeIpsec(backend, "recording", "t") if backend is not None else None
    return MediaSession(role, LOCAL, "audio", EVENTS, ipsec)


@pytest.mark.parametrize("c, m, error", [
    ("c=IN IP4 no.such.host", None, "'no.such.host' is not an IPv4 address"),
    ("c=IN IP6 ::1", None, "c= must be IN IP4"),
    ("c=IN IP4 0.0.0.0", None, "0.0.0.0 is not a unicast address"),
    ("c=IN IP4 255.255.255.255", None, "not a unicast address"),
    ("c=IN IP4 224.0.0.5", None, "not a unicast address"),
    ("c=IN IP4 239.1.1.1/127", None, "is not an IPv4 address"),
    (None, "m=audio 0 RTP/AVP 0", r"refuses the media stream \(port 0\)"),
    (None, "m=audio 65535 RTP/AVP 0", "port 65535 out of range"),
    (None, "m=video 40000 RTP/AVP 96", "SDP media is video, the call is audio"),
    (None, "m=text 40000 RTP/AVP 96", "no audio or video section"),
])
def test_remote_media_refuses(c: str | None, m: str | None, error: str) -> None:
    body = offer(c or f"c=IN IP4 {PEER}", m or "m=audio 40000 RTP/AVP 0")
    with pytest.raises(MediaError, match=error):
        remote_media(body, "audio")


def test_remote_media_takes_a_good_offer() -> None:
    key = M2mKey.fresh()
    assert remote_media(offer(key=key.serialize())) == ("audio", (PEER, 40000), key)
    assert check_media_address("10.0.3.10") == "10.0.3.10"


@in_loop
async def test_accept_remote_checks_first_and_changes_nothing() -> None:
    backend = MemoryBackend()
    fds = open_fds()
    s = session(backend)
    null = M2mKey.fresh(ealg="null").serialize()
    for body, error in [(offer(), "without a=m2m-key"),
                        (offer(key=null), "uses null/hmac-sha-256-128; this terminal uses "
                         "aes-cbc/hmac-sha-256-128"),
                        (offer(c=f"c=IN IP4 {LOCAL}", key=M2mKey.fresh().serialize()),
                         "this terminal's own address")]:
        with pytest.raises(MediaError, match=error):
            s.accept_remote(body)
        assert s.remote is None and s.remote_key is None
    s.accept_remote(offer(key=M2mKey.fresh().serialize()))
    s.establish("call-1")
    assert len(backend.sad) == 2 and len(backend.spd) == 4
    await s.close("done")
    assert backend.sad == {} and backend.spd == {}
    assert open_fds() - fds == set()  # RTP and RTCP sockets of the receiver


@in_loop
async def test_never_started_session_closes_both_sockets() -> None:
    fds = open_fds()
    await session(None).close("refused")
    assert open_fds() - fds == set()


@in_loop
async def test_establish_failure_installs_nothing() -> None:
    backend = MemoryBackend()
    s = session(backend)
    theirs = M2mKey.fresh()
    s.accept_remote(offer(key=theirs.serialize()))
    assert s.local_key is not None
    backend.sad[(LOCAL, s.local_key.spi)] = object()  # type: ignore[assignment]  # taken
    with pytest.raises(MediaError, match="media SAs: .*already exists"):
        s.establish("call-1")
    assert s.saset is None and s.call_id == "" and len(backend.sad) == 1
    assert backend.spd == {}


def _exported(backend: MemoryBackend) -> tuple[dict, dict]:
    s = session(backend, Role.OFFERER)
    s.accept_remote(offer(key=M2mKey.fresh().serialize()))
    s.establish("call-1")
    return s.export()


@pytest.mark.parametrize("security, keys, remote, error", [
    ({"offer": 5, "answer": 5}, None, (PEER, 41000), "security.offer must be a string"),
    ("x", None, (PEER, 41000), "security must be an object"),
    (None, {"offer-to-answer": {"enc": "00", "auth": "00"},
            "answer-to-offer": {"enc": "00", "auth": "00"}}, (PEER, 41000),
     "aes-cbc/hmac-sha-256-128 takes 16\\+32 bytes, got 1\\+1"),
    (None, {"offer-to-answer": {"enc": "zz", "auth": "00"}}, (PEER, 41000), "must be hex"),
    (None, None, ("garbage", 41000), "peer address 'garbage' is not an IPv4 address"),
    (None, None, (PEER, 0), "peer port 0 out of range"),
    (None, None, (PEER, "41000"), "peer port '41000' out of range"),
])
@in_loop
async def test_adopt_checks_everything_first(security: object, keys: object, remote: tuple,
                                             error: str) -> None:
    backend = MemoryBackend()
    good_security, good_keys = _exported(backend)
    installed = dict(backend.sad)
    s = session(backend, Role.ANSWERER)
    with pytest.raises(MediaError, match=error):
        s.adopt(good_security if security is None else security,
                good_keys if keys is None else keys, remote, "call-1")
    assert s.remote_key is None and s.keys is None and s.remote is None and backend.sad == installed
    await s.close("test")


@in_loop
async def test_adopt_then_establish_reuses_the_keys() -> None:
    backend = MemoryBackend()
    security, keys = _exported(backend)
    other = MemoryBackend()
    s = session(other, Role.ANSWERER)
    s.adopt(security, keys, (PEER, 41000), "call-1")
    s.establish("call-1")
    assert len(other.sad) == 2
    await s.close("test")


@in_loop
async def test_renegotiate_refuses_before_changing_anything() -> None:
    backend = MemoryBackend()
    s = session(backend)
    s.accept_remote(offer(key=M2mKey.fresh().serialize()))
    s.establish("call-1")
    before = (s.remote, s.local_ip, s.local_key, s.remote_key, s.saset, dict(backend.sad),
              dict(backend.spd))
    mine = M2mKey.fresh()
    for args, error in [
        ({"remote": ("no.such.host", 40000)}, "not an IPv4 address"),
        ({"remote": (PEER, 0)}, "port 0 out of range"),
        ({"local_ip": "::1"}, "not an IPv4 address"),
        ({"remote": (PEER, 40000)}, "nothing to move"),  # the very addresses in use
        ({"theirs": M2mKey.fresh(ealg="null")}, "uses null"),
    ]:
        theirs = args.pop("theirs", M2mKey.fresh())
        with pytest.raises(MediaError, match=error):
            s.renegotiate(Role.ANSWERER, mine, theirs, **args)  # type: ignore[arg-type]
        assert (s.remote, s.local_ip, s.local_key, s.remote_key, s.saset, dict(backend.sad),
                dict(backend.spd)) == before
    s.renegotiate(Role.ANSWERER, mine, M2mKey.fresh(), remote=("127.0.0.4", 40000))
    assert s.remote == ("127.0.0.4", 40000) and len(backend.sad) == 2
    await s.close("test")
    assert backend.sad == {} and backend.spd == {}


@in_loop
async def test_rekey_steps_out_of_turn() -> None:
    backend = MemoryBackend()
    s = session(backend)
    s.accept_remote(offer(key=M2mKey.fresh().serialize()))
    s.establish("call-1")
    installed = dict(backend.sad)
    for step, error in [(lambda: s.rekey_commit(M2mKey.fresh()), "rekey answer out of turn"),
                        (s.rekey_switch_outbound, "rekey commit out of turn"),
                        (s.rekey_finish, "rekey done out of turn"),
                        (lambda: s.rekey_answer(M2mKey.fresh(ealg="null"), set()),
                         "uses null")]:
        with pytest.raises(MediaError, match=error):
            step()
        assert dict(backend.sad) == installed
    mine = s.rekey_answer(M2mKey.fresh(), set())  # in turn: the new inbound SA goes in
    assert mine.spi != s.local_key.spi and len(backend.sad) == 3  # type: ignore[union-attr]
    with pytest.raises(MediaError, match="rekey offer out of turn"):
        s.rekey_answer(M2mKey.fresh(), set())
    await s.close("mid-rekey")
    assert backend.sad == {} and backend.spd == {}  # the rekey's new SA too


@in_loop
async def test_no_keys_to_export_in_open_mode() -> None:
    s = session(None)
    s.accept_remote(offer())
    with pytest.raises(MediaError, match="no media keys to reuse"):
        s.export()
    s.receiver.close()
