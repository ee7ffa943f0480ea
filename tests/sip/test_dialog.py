"""Dialogs: route sets, CSeq ordering, ACK for 2xx, re-INVITE, UPDATE, BYE, CANCEL and
MESSAGE, end to end through a minimal record-routing stateful proxy with packet loss."""

from __future__ import annotations

import asyncio

import pytest

from nodes.sip.checks import Policy, SipError
from nodes.sip.dialog import Dialog, DialogState, UserAgent, uri_address
from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Request, Response, parse_message, response_to
from nodes.sip.timers import TimerConfig
from nodes.sip.transaction import ServerTransaction
from nodes.sip.transport import MemoryNetwork, drop_first
from nodes.sip.uri import SipUri

pytestmark = pytest.mark.timeout(30)
CFG = TimerConfig.lab(0.05)
A, P, B = ("10.0.1.10", 5060), ("10.0.0.1", 5060), ("10.0.2.10", 5060)
SDP1, SDP2 = b"v=0\r\no=a 1 1 IN IP4 10.0.1.10\r\n", b"v=0\r\no=a 1 2 IN IP4 10.0.1.11\r\n"


def invite_and_ok(record_route: list[str], contact: str = "<sip:b1@10.0.2.10>") -> tuple[
        Request, Response]:
    req = Request("INVITE", "sip:b1@m2m.example", [
        ("Via", "SIP/2.0/UDP 10.0.1.10;branch=z9hG4bK1"),
        ("From", "A <sip:a1@m2m.example>;tag=fa"), ("To", "<sip:b1@m2m.example>"),
        ("Call-ID", "d1"), ("CSeq", "7 INVITE"), ("Contact", "<sip:a1@10.0.1.10>"),
        *(("Record-Route", rr) for rr in record_route)])
    resp = response_to(req, 200, to_tag="tb", headers=[
        *(("Record-Route", rr) for rr in record_route), ("Contact", contact)])
    return req, resp


def test_uac_route_set_is_reversed_record_route() -> None:
    req, resp = invite_and_ok(["<sip:p2.example;lr>", "<sip:10.0.0.1;lr>"])
    dlg = Dialog.as_uac(req, resp)
    assert dlg.id == ("d1", "fa", "tb") and dlg.local_seq == 7
    bye, hop = dlg.new_request("BYE")
    assert str(bye.uri) == "sip:b1@10.0.2.10"
    assert bye.values("route") == ["<sip:10.0.0.1;lr>", "<sip:p2.example;lr>"]
    assert hop == ("10.0.0.1", 5060)
    assert bye.cseq is not None and bye.cseq.number == 8
    assert bye.get("from") == "A <sip:a1@m2m.example>;tag=fa"
    assert bye.get("to") == "<sip:b1@m2m.example>;tag=tb"
    ack, _ = dlg.new_request("ACK")
    assert ack.cseq is not None and (ack.cseq.number, ack.cseq.method) == (7, "ACK")


def test_uas_route_set_keeps_order_and_strict_routing() -> None:
    req, _ = invite_and_ok(["<sip:10.0.0.9>", "<sip:10.0.0.1;lr>"])
    dlg = Dialog.as_uas(req, "tb")
    assert [str(r) for r in dlg.route_set] == ["<sip:10.0.0.9>", "<sip:10.0.0.1;lr>"]
    bye, hop = dlg.new_request("BYE")
    # The first route is a strict router: it becomes the Request-URI.
    assert str(bye.uri) == "sip:10.0.0.9" and hop == ("10.0.0.9", 5060)
    assert bye.values("route") == ["<sip:10.0.0.1;lr>", "<sip:a1@10.0.1.10>"]


def test_lower_remote_cseq_is_refused_with_500() -> None:
    req, _ = invite_and_ok([])
    dlg = Dialog.as_uas(req, "tb")
    late = Request("UPDATE", "sip:b1@10.0.2.10", [("CSeq", "6 UPDATE"),
                                                 ("Contact", "<sip:a1@10.0.1.99>")])
    with pytest.raises(SipError) as info:
        dlg.receive_request(late)
    assert (info.value.status, info.value.reason) == (500, "CSeq out of order")
    newer = Request("UPDATE", "sip:b1@10.0.2.10", [("CSeq", "8 UPDATE"),
                                                  ("Contact", "<sip:a1@10.0.1.99>")])
    dlg.receive_request(newer)
    assert dlg.remote_seq == 8 and str(dlg.remote_target) == "sip:a1@10.0.1.99"


def test_dialog_needs_tags_and_one_contact() -> None:
    req, resp = invite_and_ok([])
    resp.remove("contact")
    with pytest.raises(ValueError, match="exactly one Contact"):
        Dialog.as_uac(req, resp)
    req, resp = invite_and_ok([], contact="<tel:+1234>")  # no in-dialog request could go
    with pytest.raises(ValueError, match="a SIP URI as its Contact"):
        Dialog.as_uac(req, resp)
    assert uri_address(SipUri.parse("sip:x@10.0.0.5:5070;maddr=10.0.0.6")) == ("10.0.0.6", 5070)


class MiniProxy:
    """Just enough of a record-routing stateful proxy to carry a dialog: users map to
    fixed addresses; it forwards with its own Via and relays responses."""

    def __init__(self, net: MemoryNetwork, users: dict[str, tuple[str, int]]) -> None:
        self.users = users
        self.ep = SipEndpoint(net.transport(P), self.handle, timers=CFG, auto_trying=False,
                              answer_cancel=False, policy=Policy(role="proxy"), name="P")
        self.ep.ack_handler = self.forward_stateless
        self.me = SipUri("10.0.0.1", port=5060).replace(params=None)

    def _target(self, req: Request) -> tuple[Request, tuple[str, int]]:
        fwd = req.copy()
        routes = fwd.values("route")
        if routes and "10.0.0.1" in routes[0]:
            fwd.pop_top("route")
        mf = fwd.max_forwards
        fwd.set("Max-Forwards", (mf if mf is not None else 70) - 1)
        uri = fwd.uri
        assert isinstance(uri, SipUri)
        addr = self.users.get(uri.user or "") or uri.host_port()
        return fwd, addr

    async def handle(self, tx: ServerTransaction) -> None:
        tx.retransmit_2xx = False  # the UAS retransmits its own 2xx
        fwd, addr = self._target(tx.request)
        if fwd.method == "INVITE" and not fwd.to.tag:  # type: ignore[union-attr]
            fwd.add("Record-Route", "<sip:10.0.0.1;lr>", top=True)

        def relay(resp: Response) -> None:
            up = resp.copy()
            up.pop_top("via")
            tx.respond(up)

        client = self.ep.client_transaction(fwd, addr, on_provisional=relay)
        cancel_wait = asyncio.ensure_future(tx.cancelled.wait())
        final = asyncio.ensure_future(client.final())
        done, _ = await asyncio.wait({final, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
        if cancel_wait in done and not final.done():
            self.ep.cancel(client)
        cancel_wait.cancel()
        relay(await final)

    def forward_stateless(self, req: Request, _addr: tuple[str, int]) -> None:
        fwd, addr = self._target(req)
        self.ep.send_stateless(fwd, addr)


async def wait_for(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_call_through_proxy_with_loss() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        # Lose A's first INVITE and the first 200 OK that B sends: retransmissions fix both.
        net.rules.append(drop_first(1, src=A))
        net.rules.append(lambda p: p.src == B and p.data.startswith(b"SIP/2.0 200")
                         and len(net.sent(B, b"SIP/2.0 200")) == 1)
        proxy = MiniProxy(net, {"a1": A, "b1": B})
        seen: list[tuple[str, bytes]] = []

        async def b_app(tx: ServerTransaction, dlg: Dialog | None) -> None:
            seen.append((tx.request.method, tx.request.body))
            if tx.request.method == "INVITE" and dlg is None:
                ua_b.answer(tx, 200, body=SDP2, content_type="application/sdp")

        ua_a = UserAgent(SipEndpoint(net.transport(A), timers=CFG, name="A"),
                         "sip:a1@m2m.example")
        ua_b = UserAgent(SipEndpoint(net.transport(B), timers=CFG, name="B"),
                         "sip:b1@m2m.example", on_request=b_app)
        resp, dlg_a = await ua_a.invite("sip:b1@m2m.example", P, body=SDP1)
        assert resp.status == 200 and dlg_a is not None and resp.body == SDP2
        assert [str(r.uri) for r in dlg_a.route_set] == ["sip:10.0.0.1;lr"]
        await wait_for(lambda: len(ua_b.dialogs) == 1)
        dlg_b = next(iter(ua_b.dialogs.values()))
        assert dlg_b.id == (dlg_a.call_id, dlg_a.remote_tag, dlg_a.local_tag)
        # The ACK for the 2xx went A -> proxy -> B (route set) and stopped B's 2xx.
        await wait_for(lambda: any(p.data.startswith(b"ACK") for p in net.sent(P)))
        assert parse_message(net.sent(P, b"ACK")[0].data).uri == ua_b.contact

        # re-INVITE with a new offer, then UPDATE (RFC 3311), both in the dialog.
        resp = await ua_a.request(dlg_a, "INVITE", body=SDP1, content_type="application/sdp")
        assert resp.status == 200
        resp = await ua_a.request(dlg_a, "UPDATE", body=SDP2, content_type="application/sdp")
        assert resp.status == 200
        # In-dialog MESSAGE from the callee, routed by B's own route set.
        resp = await ua_b.request(dlg_b, "MESSAGE", body=b"hi", content_type="text/plain")
        assert resp.status == 200
        assert [m for m, _ in seen] == ["INVITE", "INVITE", "UPDATE"]
        assert dlg_b.remote_seq == dlg_a.local_seq

        resp = await ua_a.request(dlg_a, "BYE")
        assert resp.status == 200
        await wait_for(lambda: not ua_b.dialogs)
        assert dlg_a.state is DialogState.TERMINATED and dlg_b.state is DialogState.TERMINATED
        with pytest.raises(ValueError, match="is terminated"):
            await ua_a.request(dlg_a, "BYE")
        for ep in (ua_a.endpoint, ua_b.endpoint, proxy.ep):
            await ep.close()
    asyncio.run(main())


def test_out_of_order_and_unknown_dialog_requests() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        ua_a = UserAgent(SipEndpoint(net.transport(A), timers=CFG), "sip:a1@m2m.example")
        ua_b = UserAgent(SipEndpoint(net.transport(B), timers=CFG), "sip:b1@m2m.example")
        _, dlg = await ua_a.invite("sip:b1@10.0.2.10", B)
        assert dlg is not None
        resp = await ua_a.request(dlg, "INFO")
        assert resp.status == 200
        dlg.local_seq = 0  # the next request goes out with CSeq 1 < 2
        resp = await ua_a.request(dlg, "INFO")
        assert (resp.status, resp.reason) == (500, "CSeq out of order")
        dlg.remote_tag = "nosuchtag"
        resp = await ua_a.request(dlg, "BYE")
        assert resp.status == 481
        await ua_a.endpoint.close()
        await ua_b.endpoint.close()
    asyncio.run(main())


def test_cancel_and_message_outside_dialog() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        got: list[bytes] = []

        async def b_app(tx: ServerTransaction, dlg: Dialog | None) -> None:
            if tx.request.method == "INVITE":
                tx.reply(180)
                await tx.cancelled.wait()
            else:
                got.append(tx.request.body)
                tx.reply(200)

        ua_a = UserAgent(SipEndpoint(net.transport(A), timers=CFG), "sip:a1@m2m.example")
        ua_b = UserAgent(SipEndpoint(net.transport(B), timers=CFG), "sip:b1@m2m.example",
                         on_request=b_app)
        rang: list[int] = []
        tx = ua_a.start_invite("sip:b1@10.0.2.10", B, on_provisional=lambda r: rang.append(
            r.status))
        await wait_for(lambda: 180 in rang)
        assert (await ua_a.cancel(tx).final()).status == 200
        resp, dlg = await ua_a.complete_invite(tx)
        assert resp.status == 487 and dlg is None and not ua_b.dialogs
        resp = await ua_a.message("sip:b1@10.0.2.10", B, b'{"type": "rekey"}',
                                  "application/smig+json")
        assert resp.status == 200 and got == [b'{"type": "rekey"}']
        await ua_a.endpoint.close()
        await ua_b.endpoint.close()
    asyncio.run(main())


# -- received/rport (RFC 3261 §18.2.1, RFC 3581), request filters, unacknowledged 2xx ----------
X = ("10.0.9.9", 40001)  # a client somewhere
FAST = TimerConfig.lab(0.01)  # Timer L: 0.64 s


def _raw(method: str, via: str, extra: str = "", branch: str = "z9hG4bKraw1") -> bytes:
    return (f"{method} sip:b1@10.0.2.10 SIP/2.0\r\nVia: {via};branch={branch}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:a1@m2m.example>;tag=fx\r\n"
            "To: <sip:b1@m2m.example>\r\nCall-ID: raw@x\r\n"
            f"CSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n").encode()


@pytest.mark.parametrize("via, received, rport, answer_to", [
    # A client's own received/rport: never trusted; sent-by is the source, so no received.
    (f"SIP/2.0/UDP {X[0]}:{X[1]};received=127.0.0.77;rport=7777", None, str(X[1]), X),
    (f"SIP/2.0/UDP {X[0]}:5060;received=127.0.0.77;rport", None, str(X[1]), X),
    # sent-by elsewhere: received is the real source, whatever the client wrote.
    ("SIP/2.0/UDP 10.1.1.1:5060;received=127.0.0.77;rport=7777", X[0], str(X[1]), X),
    ("SIP/2.0/UDP 10.1.1.1:5060;received=127.0.0.77", X[0], None, (X[0], 5060)),
    (f"SIP/2.0/UDP 10.1.1.1:5060;received={X[0]}", X[0], None, (X[0], 5060)),
    (f"SIP/2.0/UDP {X[0]}:{X[1]};rport", None, str(X[1]), X),
    (f"SIP/2.0/UDP {X[0]}:{X[1]}", None, None, X),
])
def test_received_and_rport_say_where_the_request_came_from(
        via: str, received: str | None, rport: str | None, answer_to: tuple[str, int]
) -> None:
    """The breaker's case first: sent-by equal to the source with a client-supplied
    received=127.0.0.77;rport=7777 was kept, and the responses went to 127.0.0.77:7777."""
    async def main() -> None:
        net = MemoryNetwork()
        seen: list[Request] = []

        def handler(tx: ServerTransaction) -> None:
            seen.append(tx.request)
            tx.reply(200)

        ep = SipEndpoint(net.transport(B), handler, timers=CFG)
        net.transport(X).send(_raw("OPTIONS", via), B)
        await wait_for(lambda: net.sent(B))
        top = seen[0].vias[0]
        assert (top.received, top.params.get("rport")) == (received, rport)
        answer = net.sent(B)[0]
        assert answer.dst == answer_to
        assert b"127.0.0.77" not in answer.data and b"7777" not in answer.data
        await ep.close()
    asyncio.run(main())


def test_request_filter_drops_requests_without_a_word() -> None:
    """A terminal's port 5060 in ipsec-m2ms mode: requests from anyone are dropped, before
    any answer (no 100, no 400 for a malformed one, no ACK handling); responses to its own
    requests still arrive."""
    async def main() -> None:
        net = MemoryNetwork()
        handled: list[str] = []
        ep = SipEndpoint(net.transport(B), lambda tx: handled.append(tx.request.method),
                         timers=CFG)
        ep.ack_handler = lambda req, _src: handled.append("ACK")
        dropped: list[tuple[str | None, tuple[str, int]]] = []
        ep.request_filter = lambda source: source == A
        ep.on_filtered = lambda method, source: dropped.append((method, source))
        client = net.transport(X)
        via = f"SIP/2.0/UDP {X[0]}:{X[1]}"
        client.send(_raw("INVITE", via), B)
        client.send(_raw("ACK", via), B)
        client.send(b"OPTIONS sip:b1 SIP/2.0\r\nVia: " + via.encode() + b"\r\nBroken\r\n\r\n",
                    B)
        await asyncio.sleep(0.1)
        assert net.sent(B) == [] and handled == []
        assert dropped == [("INVITE", X), ("ACK", X), (None, X)]
        net.transport(A).send(_raw("OPTIONS", f"SIP/2.0/UDP {A[0]}:{A[1]}"), B)
        await wait_for(lambda: handled == ["OPTIONS"])
        # its own requests get their answers from anywhere
        peer = SipEndpoint(net.transport(X), lambda tx: tx.reply(200), timers=CFG)
        req = Request("OPTIONS", "sip:x@10.0.9.9", [
            ("From", "<sip:b1@m2m.example>;tag=fb"), ("To", "<sip:x@m2m.example>"),
            ("Call-ID", "out@b"), ("CSeq", "1 OPTIONS")])
        assert (await ep.request(req, X)).status == 200
        await ep.close()
        await peer.close()
    asyncio.run(main())


@pytest.mark.parametrize("ack", [False, True])
def test_unacknowledged_2xx_is_reported(ack: bool) -> None:
    """§13.3.1.4: after Timer L without an ACK the UA core says so (the terminal then ends
    the session with a BYE); an acknowledged 2xx is left alone."""
    async def main() -> None:
        net = MemoryNetwork()
        if not ack:
            net.rules.append(lambda p: p.data.startswith(b"ACK"))
        timed_out: list[Dialog] = []

        async def b_app(tx: ServerTransaction, dlg: Dialog | None) -> None:
            if dlg is None:
                ua_b.answer(tx, 200)  # (a re-INVITE gets the UA core's 200)

        ua_a = UserAgent(SipEndpoint(net.transport(A), timers=FAST), "sip:a1@m2m.example")
        ua_b = UserAgent(SipEndpoint(net.transport(B), timers=FAST), "sip:b1@m2m.example",
                         on_request=b_app)
        ua_b.on_ack_timeout = timed_out.append
        _, dlg = await ua_a.invite("sip:b1@10.0.2.10", B)
        assert dlg is not None
        await asyncio.sleep(FAST.l + 0.3)
        if ack:
            assert timed_out == []
        else:
            assert [d.call_id for d in timed_out] == [dlg.call_id]
        # a re-INVITE's 2xx is watched the same way
        resp = await ua_a.request(dlg, "INVITE")
        assert resp.status == 200
        await asyncio.sleep(FAST.l + 0.3)
        assert len(timed_out) == (0 if ack else 2)
        await ua_a.endpoint.close()
        await ua_b.endpoint.close()
    asyncio.run(main())


@pytest.mark.parametrize("contact, reason", [
    ("", "A dialog-creating request needs exactly one Contact"),
    ("Contact: <sip:a@10.0.9.9>\r\nContact: <sip:b@10.0.9.9>\r\n",
     "A dialog-creating request needs exactly one Contact"),
    ("Contact: *\r\n", "A dialog-creating request needs exactly one Contact"),
    ("Contact: <tel:+123>\r\n", "A dialog-creating request needs a SIP URI as its Contact"),
])
def test_invite_no_dialog_can_come_from_is_400(contact: str, reason: str) -> None:
    """The app never sees it: a terminal used to set up the media (and SAs) first, then
    fail with a traceback and a 500, and keep the media."""
    async def main() -> None:
        net = MemoryNetwork()
        seen: list[str] = []

        async def app(tx: ServerTransaction, dlg: Dialog | None) -> None:
            seen.append(tx.request.method)

        ua = UserAgent(SipEndpoint(net.transport(B), timers=CFG), "sip:b1@m2m.example",
                       on_request=app)
        net.transport(X).send(_raw("INVITE", f"SIP/2.0/UDP {X[0]}:{X[1]}", contact), B)
        await wait_for(lambda: net.sent(B, b"SIP/2.0 400"))
        assert net.sent(B, b"SIP/2.0 400")[0].data.startswith(f"SIP/2.0 400 {reason}\r\n"
                                                             .encode())
        assert seen == [] and ua.dialogs == {}
        await ua.endpoint.close()
    asyncio.run(main())
