"""Send hand-made SIP requests from inside a lab host; prints each final status as JSON.

    python tests/lab/sipsend.py --local IP --proxy IP --as a2 REGISTER:a2 MESSAGE:b1:b2

Each step is METHOD:TO[:FROM] (FROM defaults to --as): lets a test register as one
terminal and then claim to be another (a spoofed From), which a well-behaved UA never does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.message import Request
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import TransactionTimeout
from nodes.sip.transport import UdpTransport


async def main(args: argparse.Namespace) -> None:
    ep = SipEndpoint(await UdpTransport.create(args.local, args.port),
                     timers=TimerConfig(t1=0.05, timer_d=0.2))
    results = []
    try:
        for step in args.steps:
            method, to, *rest = step.split(":")
            frm = rest[0] if rest else args.as_
            uri = f"sip:{to}@{args.domain}" if method != "REGISTER" else f"sip:{args.domain}"
            req = Request(method, uri, [
                ("From", f"<sip:{frm}@{args.domain}>;tag={new_tag()}"),
                ("To", f"<sip:{to}@{args.domain}>"), ("Call-ID", f"{new_tag()}@sipsend"),
                ("CSeq", f"1 {method}"), ("Contact", f"<sip:{frm}@{args.local}:{args.port}>"),
                ("Expires", "300")], b"hello" if method == "MESSAGE" else b"")
            try:
                status = (await ep.request(req, (args.proxy, 5060))).status
            except TransactionTimeout:
                status = 0
            results.append({"step": step, "status": status})
    finally:
        await ep.close()
    print(json.dumps(results))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--local", required=True)
    p.add_argument("--port", type=int, default=5070)
    p.add_argument("--proxy", required=True)
    p.add_argument("--as", dest="as_", required=True)
    p.add_argument("--domain", default="m2m.example")
    p.add_argument("steps", nargs="+")
    asyncio.run(main(p.parse_args()))
    sys.exit(0)
