"""Misbehaving sec-agree clients, run inside a lab host by the secure-lab tests.

    python tests/lab/secattack.py --name b2 --local 10.0.3.20 --proxy 10.0.0.10 \\
        --ipsec userspace --credentials config/credentials.json ATTACK

ATTACK is one of:
  downgrade   Fig 1 with a Security-Verify that lists weaker algorithms than were agreed
  malformed   an unprotected REGISTER with a garbage Security-Client
  nomech      an unprotected REGISTER offering only algorithms the proxy does not accept
  spoof       registers properly, then sends MESSAGE to b1 with From: b1 over its channel
  plain       registers properly, then sends MESSAGE from its protected port-c in plaintext
              to the proxy's port 5060
  wrongpsk    Fig 1 with a PSK the proxy does not have for this terminal

Prints one JSON object: the statuses seen and what is left in this host's SA table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from functools import partial

from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import Credentials
from nodes.secreg import RegistrationError, SecRegClient
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.message import Request
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import TransactionTimeout
from nodes.sip.transport import Addr, UdpTransport

DOMAIN = "m2m.example"
T = TimerConfig(t1=0.1, timer_d=0.5)


def register(aor: str, call_id: str, cseq: list[int], contact: Addr) -> Request:
    cseq[0] += 1
    user = aor.removeprefix("sip:").split("@")[0]
    return Request("REGISTER", f"sip:{DOMAIN}", [
        ("From", f"<{aor}>;tag={new_tag()}"), ("To", f"<{aor}>"), ("Call-ID", call_id),
        ("CSeq", f"{cseq[0]} REGISTER"), ("Contact", f"<sip:{user}@{contact[0]}:{contact[1]}>"),
        ("Expires", "300")])


class Downgrading(SecRegClient):
    """Echoes a Security-Verify that claims SHA-1 was what the server offered."""

    @staticmethod
    def _sec_headers(req: Request, *extra: tuple[str, str]) -> None:
        swapped = [(n, v.replace("hmac-sha-256-128", "hmac-sha-1-96"))
                   if n == "Security-Verify" else (n, v) for n, v in extra]
        SecRegClient._sec_headers(req, *swapped)


async def plain_request(ep: SipEndpoint, proxy: Addr, method: str, frm: str, to: str,
                        headers: list[tuple[str, str]]) -> int:
    req = Request(method, f"sip:{to}@{DOMAIN}" if method != "REGISTER" else f"sip:{DOMAIN}", [
        ("From", f"<sip:{frm}@{DOMAIN}>;tag={new_tag()}"), ("To", f"<sip:{to}@{DOMAIN}>"),
        ("Call-ID", f"{new_tag()}@attack"), ("CSeq", f"1 {method}"), *headers])
    try:
        return (await ep.request(req, proxy)).status
    except TransactionTimeout:
        return 0


async def main(args: argparse.Namespace) -> dict[str, object]:
    aor = f"sip:{args.name}@{DOMAIN}"
    psk = Credentials.load(args.credentials).psk(args.name)
    assert psk is not None
    if args.attack == "wrongpsk":
        psk = bytes(b ^ 0xFF for b in psk)
    ipsec = NodeIpsec.create(args.ipsec, args.name)
    events = EventLog(args.name, "/dev/null")
    plain = SipEndpoint(await UdpTransport.create(args.local, 5060), timers=T)
    proxy = (args.proxy, 5060)
    result: dict[str, object] = {"attack": args.attack}
    cls = Downgrading if args.attack == "downgrade" else SecRegClient
    client = cls(ipsec, aor, psk, args.local, args.proxy, events,
                 lambda t: SipEndpoint(t, timers=T))
    build = partial(register, aor, f"{new_tag()}@attack", [0])
    try:
        if args.attack == "malformed":
            result["status"] = await plain_request(plain, proxy, "REGISTER", args.name,
                                                   args.name,
                                                   [("Security-Client", "ipsec-m2ms;;spi-c=x")])
        elif args.attack == "nomech":
            result["status"] = await plain_request(
                plain, proxy, "REGISTER", args.name, args.name,
                [("Security-Client", "ipsec-m2ms;alg=hmac-md5-96;ealg=des-ede3-cbc;"
                  "spi-c=1111;spi-s=2222;port-c=5100;port-s=5101")])
        else:
            try:
                channel, resp = await client.register(plain, build, 300, set())
                result["register"] = resp.status
            except RegistrationError as exc:
                result["register"] = str(exc)
                channel = None
            if channel is not None and args.attack == "spoof":
                result["status"] = await plain_request(
                    channel.ep_c, channel.proxy_hop, "MESSAGE", "b1", "b1",
                    [("Content-Type", "text/plain")])
            if channel is not None and args.attack == "plain":
                # From the registered source (its port-c), but to 5060: no SA covers that.
                result["status"] = await plain_request(channel.ep_c, proxy, "MESSAGE",
                                                       args.name, "b1",
                                                       [("Content-Type", "text/plain")])
            result["sas_while_registered"] = len(ipsec.backend.list_sas())
            if channel is not None:
                await client.close_channel(channel)
        result["sas_left"] = len(ipsec.backend.list_sas())
        result["counters"] = ipsec.backend.counters()
    finally:
        await plain.close()
        ipsec.close()
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--local", required=True)
    p.add_argument("--proxy", required=True)
    p.add_argument("--ipsec", default="userspace")
    p.add_argument("--credentials", required=True)
    p.add_argument("attack", choices=("downgrade", "malformed", "nomech", "spoof", "plain",
                                      "wrongpsk"))
    print(json.dumps(asyncio.run(main(p.parse_args()))))
