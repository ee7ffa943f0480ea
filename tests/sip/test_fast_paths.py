"""The stack's performance short cuts behave like the long ways: top-Via replacement keeps
the parse cache consistent, URI equivalence of identical text, transactions' lazy events."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Request, parse_message
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ServerTransaction
from nodes.sip.transport import MemoryNetwork
from nodes.sip.uri import SipUri

pytestmark = pytest.mark.timeout(10)

INVITE = (
    b"INVITE sip:b1@m2m.example SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.10:5060;branch=z9hG4bKp1, SIP/2.0/UDP 10.0.1.10;branch=z9hG4bKa\r\n"
    b"Via: SIP/2.0/UDP 10.0.9.9;branch=z9hG4bKz\r\n"
    b"From: <sip:a1@m2m.example>;tag=x\r\nTo: <sip:b1@m2m.example>\r\n"
    b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


def test_replace_top_keeps_cache_and_rest_of_list() -> None:
    msg = parse_message(INVITE)
    vias = msg.vias  # parsed and cached before the change
    frm = msg.from_
    new = vias[0].with_param("received", "10.0.0.99")
    msg.replace_top("via", new)
    assert msg.vias[0] is new and msg.vias[1:] == vias[1:] and len(msg.vias) == 3
    assert msg.from_ is frm  # nothing else was re-parsed
    assert msg.values("via")[0] == str(new) and msg.count("via") == 2
    again = parse_message(msg.serialize())  # the octets say the same as the cache
    assert [str(v) for v in again.vias] == [str(v) for v in msg.vias]
    assert again.vias[0].received == "10.0.0.99"


def test_replace_top_with_text_and_missing_header() -> None:
    req = Request("OPTIONS", "sip:b1@m2m.example", [("Via", "SIP/2.0/UDP h;branch=z9hG4bK1")])
    _ = req.vias
    req.replace_top("Via", "SIP/2.0/UDP k;branch=z9hG4bK2")
    assert req.vias[0].host == "k"
    with pytest.raises(ValueError, match="no Route header field"):
        req.replace_top("Route", "<sip:x;lr>")


def test_identical_text_equivalent_and_different_text_still_compared() -> None:
    a = SipUri.parse("sip:a1@10.0.1.10:5060;transport=udp")
    assert a.equivalent(SipUri.parse("sip:a1@10.0.1.10:5060;transport=udp"))
    assert a.equivalent(SipUri.parse("sip:a1@10.0.1.10:5060;TRANSPORT=UDP"))
    assert not a.equivalent(SipUri.parse("sip:a1@10.0.1.10:5062;transport=udp"))
    assert not a.equivalent(SipUri("10.0.1.10", "a1", port=5061))


def test_lazy_events_of_transactions() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a = SipEndpoint(net.transport(("10.0.1.10", 5060)), timers=TimerConfig.lab(0.01))
        seen = []

        async def handler(tx: ServerTransaction) -> None:
            seen.append(tx)
            tx.reply(200)

        b = SipEndpoint(net.transport(("10.0.2.10", 5060)), handler,
                        timers=TimerConfig.lab(0.01))
        req = Request("MESSAGE", "sip:b1@m2m.example", [
            ("From", "<sip:a1@m2m.example>;tag=1"), ("To", "<sip:b1@m2m.example>"),
            ("Call-ID", "m1"), ("CSeq", "1 MESSAGE")])
        ctx = a.client_transaction(req, ("10.0.2.10", 5060))
        assert (await ctx.final()).status == 200
        stx = seen[0]
        assert not stx.cancelled.is_set() and not stx.acked.is_set()
        await asyncio.wait_for(stx.terminated.wait(), 5)  # made while alive, set at the end
        await asyncio.wait_for(ctx.terminated.wait(), 5)
        assert ctx.terminated.is_set()  # made after the end: already set
        await a.close()
        await b.close()

    asyncio.run(main())


def test_finished_transactions_are_freed_without_the_cycle_collector() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        cfg = TimerConfig.lab(0.005)
        servers: list[weakref.ref[ServerTransaction]] = []

        async def handler(tx: ServerTransaction) -> None:
            servers.append(weakref.ref(tx))
            tx.reply(200)

        a = SipEndpoint(net.transport(("10.0.1.10", 5060)), timers=cfg)
        b = SipEndpoint(net.transport(("10.0.2.10", 5060)), handler, timers=cfg)
        req = Request("REGISTER", "sip:m2m.example", [
            ("From", "<sip:a1@m2m.example>;tag=1"), ("To", "<sip:a1@m2m.example>"),
            ("Call-ID", "r1"), ("CSeq", "1 REGISTER")])
        ctx = a.client_transaction(req, ("10.0.2.10", 5060))
        client = weakref.ref(ctx)
        assert (await ctx.final()).status == 200
        del ctx
        deadline = asyncio.get_running_loop().time() + 5
        while (a.transaction_count or b.transaction_count) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        assert client() is None and servers[0]() is None  # refcounting alone freed them
        await a.close()
        await b.close()

    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()


def test_bare_cr_and_lf_found_by_counting() -> None:
    good = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n"
    parse_message(good)
    for bad in (good.replace(b"UDP h", b"UDP\rh"), good.replace(b"UDP h", b"UDP\nh"),
                good.replace(b"\r\nVia", b"\nVia")):
        with pytest.raises(ValueError, match="bare CR or LF in the header section"):
            parse_message(bad)


def test_parsed_uris_shared_by_text_and_cache_bounded() -> None:
    from nodes.sip import uri as uri_module

    a = SipUri.parse("sip:a1@10.0.1.10:5060")
    assert SipUri.parse("sip:a1@10.0.1.10:5060") is a
    assert SipUri.parse("sip:a1@10.0.1.10:5062") is not a
    for i in range(uri_module._PARSED_MAX + 10):
        SipUri.parse(f"sip:u{i}@m2m.example")
    assert len(uri_module._PARSED) <= uri_module._PARSED_MAX
    for _ in range(2):  # a refusal is not cached as anything
        with pytest.raises(ValueError, match="whitespace in SIP URI 'sip:a b@c'"):
            SipUri.parse("sip:a b@c")


REGISTER = Request("REGISTER", "sip:m2m.example", [
    ("From", "<sip:a1@m2m.example>;tag=1"), ("To", "<sip:a1@m2m.example>"),
    ("Call-ID", "r1"), ("CSeq", "1 REGISTER")])


def _register_twice(handler, drop_first_answer: bool = True):  # type: ignore[no-untyped-def]
    """Sends REGISTER through a loss-free server whose first answer (if any) is lost, so
    the client retransmits; returns (server endpoint, client's final or exception, net)."""
    async def main():  # type: ignore[no-untyped-def]
        from nodes.sip.transport import drop_first

        net = MemoryNetwork()
        cfg = TimerConfig.lab(0.01)
        a = SipEndpoint(net.transport(("10.0.1.10", 5060)), timers=cfg)
        b = SipEndpoint(net.transport(("10.0.2.10", 5060)), handler, timers=cfg)
        if drop_first_answer:
            net.rules.append(drop_first(1, src=("10.0.2.10", 5060)))
        req = Request("REGISTER", REGISTER.uri, list(REGISTER.headers))
        try:
            result = await a.request(req, ("10.0.2.10", 5060))
        except Exception as e:
            result = e
        parked = b.transaction_count
        await a.close()
        await b.close()
        return result, parked, net

    return asyncio.run(main())


def test_completed_transaction_answers_retransmissions_from_its_octets() -> None:
    calls: list[ServerTransaction] = []

    def sync_handler(tx: ServerTransaction) -> None:  # answers in place: no task
        calls.append(tx)
        tx.reply(200)

    resp, parked, net = _register_twice(sync_handler)
    assert resp.status == 200 and len(calls) == 1  # the retransmission never reached it
    sent = [p.data for p in net.sent(("10.0.2.10", 5060), b"SIP/2.0 200")]
    assert len(sent) == 2 and sent[0] == sent[1]  # the same octets again
    assert parked == 1  # kept (as octets) until Timer J
    assert calls[0].state.name == "TERMINATED"  # the object itself is done


def test_discarded_request_absorbs_retransmissions_silently() -> None:
    calls: list[ServerTransaction] = []

    def dropping(tx: ServerTransaction) -> None:
        calls.append(tx)
        tx.discard()

    result, _, net = _register_twice(dropping, drop_first_answer=False)
    assert type(result).__name__ == "TransactionTimeout"
    assert len(calls) == 1  # every retransmission absorbed, none handled anew
    assert len(net.sent(("10.0.1.10", 5060), b"REGISTER")) > 3
    assert not net.sent(("10.0.2.10", 5060))


def test_sync_handler_that_raises_gets_500() -> None:
    def broken(tx: ServerTransaction) -> None:
        raise RuntimeError("boom")

    resp, _, _ = _register_twice(broken, drop_first_answer=False)
    assert resp.status == 500
