"""A SIP UA in its own process for the real-UDP test: binds 127.0.0.1 on an ephemeral
port, prints it, answers INVITE/MESSAGE/BYE, exits on stdin EOF or after a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from nodes.sip.dialog import Dialog, UserAgent
from nodes.sip.endpoint import SipEndpoint
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ServerTransaction
from nodes.sip.transport import UdpTransport

ANSWER = b"v=0\r\no=peer 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"


async def main(deadline: float) -> None:
    transport = await UdpTransport.create("127.0.0.1", 0)
    ua: UserAgent

    async def app(tx: ServerTransaction, dlg: Dialog | None) -> None:
        req = tx.request
        if req.method == "INVITE" and dlg is None:
            ua.answer(tx, 200, body=ANSWER, content_type="application/sdp")
        elif req.method == "MESSAGE":
            tx.reply(200, headers=[("X-Echo", req.body.decode(errors="replace"))])

    ua = UserAgent(SipEndpoint(transport, timers=TimerConfig.lab(0.05), name="peer"),
                   "sip:peer@127.0.0.1", on_request=app)
    print(transport.local_addr[1], flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stdin_closed, deadline)
    await ua.endpoint.close()


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0))
