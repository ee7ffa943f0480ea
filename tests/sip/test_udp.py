"""SIP over real UDP between two processes on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from nodes.sip.dialog import UserAgent
from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Response, parse_message
from nodes.sip.timers import TimerConfig
from nodes.sip.transport import UdpTransport

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "rfc4475"


@pytest.fixture
def peer_port():  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-m", "tests.sip.udp_peer", "50"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout
        assert line.strip().isdigit(), f"peer did not start: {line!r}"
        yield int(line)
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_call_and_message_over_real_udp(peer_port: int) -> None:
    async def main() -> None:
        peer = ("127.0.0.1", peer_port)
        transport = await UdpTransport.create("127.0.0.1", 0)
        ua = UserAgent(SipEndpoint(transport, timers=TimerConfig.lab(0.05)),
                       "sip:me@127.0.0.1")
        try:
            resp = await ua.message(f"sip:peer@127.0.0.1:{peer_port}", peer, b"ping")
            assert resp.status == 200 and resp.get("X-Echo") == "ping"
            offer = b"v=0\r\no=me 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            resp, dlg = await ua.invite(f"sip:peer@127.0.0.1:{peer_port}", peer, body=offer)
            assert resp.status == 200 and dlg is not None
            assert resp.body.startswith(b"v=0\r\no=peer")
            assert resp.vias[0].received is None and resp.vias[0].rport == transport.local_addr[1]
            resp = await ua.request(dlg, "UPDATE", body=offer, content_type="application/sdp")
            assert resp.status == 200
            resp = await ua.request(dlg, "BYE")
            assert resp.status == 200

            # A torture message sent as a raw datagram is refused with 400 by the peer.
            got: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            ua.endpoint.stray_response_handler = lambda r, _a: got.done() or got.set_result(r)
            raw = (DATA / "clerr.dat").read_bytes().replace(
                b"host5.example.com", b"127.0.0.1:%d" % transport.local_addr[1])
            transport.send(raw, peer)
            refusal = await asyncio.wait_for(got, 5)
            assert refusal.status == 400
            assert parse_message(bytes(refusal)).call_id == "clerr.0ha0isndaksdjweiafasdk3"
        finally:
            await ua.endpoint.close()
    asyncio.run(main())
