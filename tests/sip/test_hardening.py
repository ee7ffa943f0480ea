"""Defences of the SIP layer against a peer that writes what it likes: responses go back
to where a request came from whatever its Via claims; a request refused for a malformed
CSeq or Call-ID ends its transaction without a traceback; a transport's gate sees every
datagram before it is parsed."""

from __future__ import annotations

import asyncio
import logging

import pytest

from nodes.sip.checks import is_ip_address
from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Request, parse_message
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ServerTransaction
from nodes.sip.transport import MemoryNetwork, UdpTransport

pytestmark = pytest.mark.timeout(20)
A = ("10.0.1.10", 5070)
B = ("10.0.2.10", 5060)
CFG = TimerConfig.lab(0.05)


def request(via: str, cseq: str = "1 OPTIONS", call_id: str = "c1") -> bytes:
    return (f"OPTIONS sip:b1@m2m.example SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n"
            "From: <sip:a1@m2m.example>;tag=1\r\nTo: <sip:b1@m2m.example>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n").encode()


@pytest.mark.parametrize(("via", "expected"), [
    # rport asked for: the source port, whatever value the sender put there
    ("SIP/2.0/UDP 10.0.1.10:5070;branch=z9hG4bK1;received=10.9.9.9;rport=7777", A),
    # no rport: the sent-by port, on the host the request came from
    ("SIP/2.0/UDP 10.0.1.10:5099;branch=z9hG4bK1;received=10.9.9.9", (A[0], 5099)),
    ("SIP/2.0/UDP 10.0.1.10:5070;branch=z9hG4bK1", A),
])
def test_responses_go_back_to_the_source(via: str, expected: tuple[str, int]) -> None:
    """Whatever address the endpoint worked out from the Via: here the one an endpoint that
    believed a client-written received/rport would."""
    async def main() -> None:
        net = MemoryNetwork()
        ep = SipEndpoint(net.transport(B), timers=CFG)
        req = parse_message(request(via))
        assert isinstance(req, Request)
        top = req.vias[0]
        naive = (top.received or top.sent_by[0], top.rport or top.sent_by[1])
        tx = ServerTransaction(ep, req, A, ("k",), CFG, naive)
        assert tx.response_addr == expected
        await ep.close()
    asyncio.run(main())


def test_malformed_cseq_or_call_id_is_400_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a = SipEndpoint(net.transport(A), timers=CFG)
        b = SipEndpoint(net.transport(B), timers=CFG)
        for n, data in enumerate([request(f"SIP/2.0/UDP {A[0]}:{A[1]};branch=z9hG4bK2",
                                          cseq="x y"),
                                  request(f"SIP/2.0/UDP {A[0]}:{A[1]};branch=z9hG4bK3",
                                          call_id="a\r\nCall-ID: b")]):
            for _ in range(2):  # the retransmission gets the same answer
                a.transport.send(data, B)
                await asyncio.sleep(0.05)
            answers = net.sent(src=B)
            assert len(answers) == 2 * (n + 1)
            assert all(p.data.startswith(b"SIP/2.0 400 ") for p in answers)
        await a.close()
        await b.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # Each refusal is said once (the retransmission is answered from the stored response).
    refusals = [r.getMessage() for r in caplog.records if "refused: 400" in r.getMessage()]
    assert len(refusals) == 2 and all(f"OPTIONS from {A[0]}:{A[1]}" in m for m in refusals)


def test_gate_sees_every_datagram_before_the_receiver() -> None:
    async def main() -> None:
        seen: list[bytes] = []
        t = await UdpTransport.create("127.0.0.1", 0)
        t.set_receiver(lambda data, _addr: seen.append(data))
        t.gate = lambda data, _addr: data.startswith(b"yes")
        sender = await UdpTransport.create("127.0.0.1", 0)
        for data in (b"no 1", b"yes 2", b"no 3", b"yes 4"):
            sender.send(data, t.local_addr)
        await asyncio.sleep(0.1)
        assert seen == [b"yes 2", b"yes 4"]
        t.close()
        sender.close()
    asyncio.run(main())


@pytest.mark.parametrize(("host", "ip"), [
    ("10.0.0.1", True), ("[2001:db8::1]", True), ("::1", True), ("evil.example", False),
    ("10.0.0.256", False), ("", False), ("[evil]", False)])
def test_is_ip_address(host: str, ip: bool) -> None:
    assert is_ip_address(host) is ip
