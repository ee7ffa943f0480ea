"""A 2xx retransmitted by the callee while the proxy's INVITE client transaction is in
Accepted (RFC 6026) still reaches the caller: a lost ACK is recovered end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.message import Request, Response
from nodes.sip.transaction import ServerTransaction
from nodes.sip.transport import UdpTransport
from tests.proxy.test_proxy_loopback import Net, T, _send, free_port, run, until


def test_callee_2xx_retransmission_reaches_caller(tmp_path: Path) -> None:
    async def scenario(net: Net) -> None:
        async def answer(tx: ServerTransaction) -> None:
            if tx.request.method == "INVITE":  # never ACKed: retransmits its 200 (timer G)
                tx.reply(200, headers=[("Contact", f"<sip:b1@127.0.0.3:{callee_port}>")])

        callee_port = free_port("127.0.0.3")
        callee = SipEndpoint(await UdpTransport.create("127.0.0.3", callee_port), answer,
                             timers=T)
        caller = SipEndpoint(await UdpTransport.create("127.0.0.2", free_port("127.0.0.2")),
                             timers=T)
        try:
            assert await _send(callee, net, "REGISTER", "b1", "b1", [("Expires", "60")]) == 200
            assert await _send(caller, net, "REGISTER", "a1", "a1", [("Expires", "60")]) == 200
            invite = Request("INVITE", "sip:b1@m2m.example", [
                ("From", f"<sip:a1@m2m.example>;tag={new_tag()}"),
                ("To", "<sip:b1@m2m.example>"), ("Call-ID", f"{new_tag()}@test"),
                ("CSeq", "1 INVITE"),
                ("Contact", f"<sip:a1@127.0.0.2:{caller.local_addr[1]}>")])
            ctx = caller.client_transaction(invite, ("127.0.0.1", net.proxy.port))
            again: list[Response] = []
            ctx.on_2xx_retransmission = again.append
            assert (await ctx.final()).status == 200
            await until(lambda: len(again) >= 2, "relayed 2xx retransmissions")
            assert all(r.status == 200 and len(r.vias) == 1 for r in again)
            assert net.proxy.status()["counters"]["fwd-2xx-retransmission"] >= 2
        finally:
            await caller.close()
            await callee.close()
            await asyncio.sleep(0)

    run(scenario, tmp_path)
