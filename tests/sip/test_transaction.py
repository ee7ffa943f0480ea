"""Transactions over an in-process network with loss: retransmission, absorption,
timeouts (Timer B/F with T1 = 50 ms), CANCEL, 2xx retransmission, received/rport."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Request, Response, parse_message
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import (
    ClientInviteState,
    ServerInviteState,
    ServerTransaction,
    TransactionTimeout,
)
from nodes.sip.transport import MemoryNetwork, drop_all, drop_every_other, drop_first

pytestmark = pytest.mark.timeout(30)
A = ("10.0.1.10", 5060)
B = ("10.0.2.10", 5060)
CFG = TimerConfig.lab(0.05)
DATA = Path(__file__).resolve().parents[1] / "data" / "rfc4475"


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def make_request(method: str, n: int = 1, call_id: str = "c1") -> Request:
    return Request(method, "sip:b1@m2m.example", [
        ("From", "<sip:a1@m2m.example>;tag=fa"), ("To", "<sip:b1@m2m.example>"),
        ("Call-ID", call_id), ("CSeq", f"{n} {method}"), ("Contact", f"<sip:a1@{A[0]}>")])


class Pair:
    def __init__(self, handler: Callable[[ServerTransaction], Awaitable[None]]) -> None:
        self.net = MemoryNetwork()
        self.calls: list[ServerTransaction] = []

        async def counting(tx: ServerTransaction) -> None:
            self.calls.append(tx)
            await handler(tx)

        self.a = SipEndpoint(self.net.transport(A), timers=CFG, name="A")
        self.b = SipEndpoint(self.net.transport(B), counting, timers=CFG, name="B")

    def count(self, src: tuple[str, int], start: bytes) -> int:
        return len(self.net.sent(src, start))

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()


async def ok(tx: ServerTransaction) -> None:
    tx.reply(200)


def test_non_invite_clean_and_transactions_end() -> None:
    async def main() -> None:
        p = Pair(ok)
        resp = await p.a.request(make_request("MESSAGE"), B)
        assert resp.status == 200 and len(p.calls) == 1
        await wait_for(lambda: p.a.transaction_count == 0 and p.b.transaction_count == 0)
        await p.close()
    run(main())


@pytest.mark.parametrize("n", [1, 3])
def test_request_loss_recovered_by_timer_e(n: int) -> None:
    async def main() -> None:
        p = Pair(ok)
        p.net.rules.append(drop_first(n, src=A))
        resp = await p.a.request(make_request("MESSAGE"), B)
        assert resp.status == 200
        assert p.count(A, b"MESSAGE") == n + 1
        assert len(p.calls) == 1
        await p.close()
    run(main())


def test_response_loss_absorbed_by_server_transaction() -> None:
    async def main() -> None:
        p = Pair(ok)
        p.net.rules.append(drop_first(2, src=B))
        resp = await p.a.request(make_request("OPTIONS"), B)
        assert resp.status == 200
        assert len(p.calls) == 1  # retransmissions never reached the handler
        assert p.count(B, b"SIP/2.0 200") == 3
        await p.close()
    run(main())


def test_drop_every_other_packet_both_ways() -> None:
    async def main() -> None:
        p = Pair(ok)
        # Per direction: one global alternation would lock step with the retransmissions
        # and drop every response forever.
        p.net.rules += [drop_every_other(src=A), drop_every_other(src=B)]
        for n in range(1, 4):
            resp = await p.a.request(make_request("MESSAGE", n, f"c{n}"), B)
            assert resp.status == 200
        assert len(p.calls) == 3
        await p.close()
    run(main())


def test_timer_f_fires_when_everything_is_lost() -> None:
    async def main() -> None:
        p = Pair(ok)
        p.net.rules.append(drop_all(src=A))
        with pytest.raises(TransactionTimeout) as info:
            await p.a.request(make_request("MESSAGE"), B)
        assert str(info.value) == "Timer F fired: no final response to MESSAGE within 3.2 s"
        assert p.count(A, b"MESSAGE") >= 6  # E doubled up to T2, then every T2
        assert p.a.transaction_count == 0
        await p.close()
    run(main())


def test_timer_b_fires_and_invite_retransmits_doubling() -> None:
    async def main() -> None:
        p = Pair(ok)
        p.net.rules.append(drop_all(src=A))
        tx = p.a.client_transaction(make_request("INVITE"), B)
        with pytest.raises(TransactionTimeout) as info:
            await tx.final()
        assert str(info.value) == "Timer B fired: no response to INVITE within 3.2 s"
        assert tx.state is ClientInviteState.TERMINATED
        assert 5 <= p.count(A, b"INVITE") <= 8  # 0, T1, 3T1, 7T1 ... < 64 T1
        await p.close()
    run(main())


def test_provisional_stops_invite_retransmission() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def slow(tx: ServerTransaction) -> None:
            tx.reply(180)
            await release.wait()
            tx.reply(200)

        p = Pair(slow)
        provisional: list[int] = []
        tx = p.a.client_transaction(make_request("INVITE"), B,
                                    on_provisional=lambda r: provisional.append(r.status))
        await wait_for(lambda: 180 in provisional)
        await asyncio.sleep(10 * CFG.t1)
        assert p.count(A, b"INVITE") == 1
        release.set()
        resp = await tx.final()
        assert resp.status == 200 and provisional == [100, 180]
        await p.close()
    run(main())


def test_non_2xx_final_lost_then_acked() -> None:
    async def main() -> None:
        async def busy(tx: ServerTransaction) -> None:
            tx.reply(486)

        p = Pair(busy)
        p.net.rules.append(drop_first(1, src=B, dst=A))  # the 100 Trying
        p.net.rules.append(lambda pk: pk.src == B and pk.data.startswith(b"SIP/2.0 486")
                           and len(p.net.sent(B, b"SIP/2.0 486")) == 1)
        resp = await p.a.request(make_request("INVITE"), B)
        assert resp.status == 486
        server = p.calls[0]
        await wait_for(lambda: server.state in (ServerInviteState.CONFIRMED,
                                                ServerInviteState.TERMINATED))
        acks = p.net.sent(A, b"ACK")
        assert acks and parse_message(acks[0].data).vias[0].branch == \
            parse_message(p.net.sent(A, b"INVITE")[0].data).vias[0].branch
        await p.close()
    run(main())


def test_2xx_retransmitted_until_ack() -> None:
    async def main() -> None:
        p = Pair(ok)
        resp = await p.a.request(make_request("INVITE"), B)
        assert resp.status == 200
        await wait_for(lambda: p.count(B, b"SIP/2.0 200") >= 3)
        server = p.calls[0]
        assert not server.acked.is_set()
        ack = make_request("ACK")
        ack.set("To", resp.get("to"))
        p.a.send_stateless(ack, B)
        await wait_for(server.acked.is_set)
        sent = p.count(B, b"SIP/2.0 200")
        await asyncio.sleep(10 * CFG.t1)
        assert p.count(B, b"SIP/2.0 200") == sent
        await p.close()
    run(main())


def test_cancel_pending_invite() -> None:
    async def main() -> None:
        async def ringing(tx: ServerTransaction) -> None:
            tx.reply(180)
            await tx.cancelled.wait()

        p = Pair(ringing)
        tx = p.a.client_transaction(make_request("INVITE"), B)
        await wait_for(lambda: tx.last_response is not None and tx.last_response.status == 180)
        cancel_resp = await p.a.cancel(tx).final()
        assert cancel_resp.status == 200
        final = await tx.final()
        assert final.status == 487
        await p.close()
    run(main())


def test_cancel_without_invite_gets_481() -> None:
    async def main() -> None:
        p = Pair(ok)
        req = make_request("CANCEL")
        resp = await p.a.request(req, B)
        assert resp.status == 481
        await p.close()
    run(main())


def test_received_and_rport_route_the_response() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        # A advertises an address it is not reachable at (a NAT): rport saves it.
        a = SipEndpoint(net.transport(A), timers=CFG, advertised=("192.0.2.99", 5999))
        b = SipEndpoint(net.transport(B), ok, timers=CFG)
        resp = await a.request(make_request("OPTIONS"), B)
        via = resp.vias[0]
        assert via.received == A[0] and via.rport == A[1]
        await a.close()
        await b.close()
    run(main())


def test_malformed_requests_answered_or_dropped() -> None:
    async def main() -> None:
        p = Pair(ok)
        got: list[Response] = []
        p.a.stray_response_handler = lambda r, _addr: got.append(r)
        p.a.transport.send((DATA / "clerr.dat").read_bytes(), B)
        p.a.transport.send((DATA / "bigcode.dat").read_bytes(), B)
        p.a.transport.send((DATA / "unkscm.dat").read_bytes(), B)
        await wait_for(lambda: len(got) == 2)
        assert sorted(r.status for r in got) == [400, 416]
        assert not p.calls
        await p.close()
    run(main())


def test_rfc2543_request_matching_without_magic_cookie() -> None:
    async def main() -> None:
        p = Pair(ok)
        got: list[Response] = []
        p.a.stray_response_handler = lambda r, _addr: got.append(r)
        raw = (b"OPTIONS sip:b1@m2m.example SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.1.10:5060\r\n"
               b"From: <sip:a1@m2m.example>;tag=x\r\nTo: <sip:b1@m2m.example>\r\n"
               b"Call-ID: old-1\r\nCSeq: 5 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        p.a.transport.send(raw, B)
        await wait_for(lambda: len(got) == 1)
        p.a.transport.send(raw, B)
        await wait_for(lambda: len(got) == 2)
        assert len(p.calls) == 1 and [r.status for r in got] == [200, 200]
        await p.close()
    run(main())


def test_handler_exception_gives_500() -> None:
    async def broken(tx: ServerTransaction) -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        p = Pair(broken)
        resp = await p.a.request(make_request("MESSAGE"), B)
        assert resp.status == 500
        await p.close()
    run(main())
