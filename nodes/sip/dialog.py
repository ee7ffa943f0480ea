"""Dialogs (RFC 3261 §12) and a small UA core on top of SipEndpoint.

``Dialog`` holds the dialog state (route set from Record-Route, CSeq numbers, remote
target) and builds in-dialog requests; ``UserAgent`` runs INVITE/ACK/re-INVITE/UPDATE
(RFC 3311)/BYE/CANCEL and MESSAGE in and out of dialogs. A 2xx to an INVITE that is never
acknowledged (Timer L, 64*T1) is reported to `on_ack_timeout`: the session is to be ended
with a BYE (§13.3.1.4).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from enum import Enum
from typing import Any

from nodes.sip.checks import SipError
from nodes.sip.endpoint import SipEndpoint, new_tag
from nodes.sip.headers import STAR, NameAddr
from nodes.sip.message import HeaderInput, Request, Response
from nodes.sip.transaction import ClientTransaction, ServerTransaction
from nodes.sip.transport import Addr
from nodes.sip.uri import SipUri, Uri, parse_uri

log = logging.getLogger(__name__)


class DialogState(Enum):
    EARLY = "Early"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"


def uri_address(uri: Uri) -> Addr:
    """Transport address of a SIP URI (maddr wins; hosts must be IP literals here)."""
    if not isinstance(uri, SipUri):
        raise ValueError(f"cannot route to non-SIP URI {uri}")
    host, port = uri.host_port()
    return uri.param("maddr") or host, port


class Dialog:
    """One dialog, from either side."""

    def __init__(self, call_id: str, local_tag: str, remote_tag: str, local_uri: NameAddr,
                 remote_uri: NameAddr, remote_target: Uri, route_set: list[NameAddr],
                 local_seq: int, remote_seq: int | None) -> None:
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_uri = local_uri
        self.remote_uri = remote_uri
        self.remote_target = remote_target
        self.route_set = route_set
        self.local_seq = local_seq
        self.remote_seq = remote_seq
        self.state = DialogState.CONFIRMED
        self.invite_cseq = local_seq  # CSeq of the last INVITE we sent (for its ACK)

    @property
    def id(self) -> tuple[str, str, str]:
        return self.call_id, self.local_tag, self.remote_tag

    def _set_state(self, new: DialogState) -> None:
        if new is not self.state:
            log.debug("dialog %s: %s -> %s", self.call_id, self.state.value, new.value)
            self.state = new

    def terminate(self) -> None:
        self._set_state(DialogState.TERMINATED)

    @classmethod
    def as_uac(cls, request: Request, response: Response) -> Dialog:
        """§12.1.2: from our request and the 2xx (or tagged 1xx) it got."""
        frm, to, cseq = request.from_, response.to, request.cseq
        contacts = response.contacts
        if frm is None or to is None or cseq is None or request.call_id is None:
            raise ValueError("request/response lack dialog headers")
        if not frm.tag or not to.tag:
            raise ValueError("dialog needs From and To tags")
        if contacts == STAR or len(contacts) != 1:
            raise ValueError("a dialog-creating response needs exactly one Contact")
        if not isinstance(contacts[0].uri, SipUri):
            raise ValueError("a dialog-creating response needs a SIP URI as its Contact")
        routes = list(reversed(response.record_routes))
        dlg = cls(request.call_id, frm.tag, to.tag, _strip_tag(frm), _strip_tag(to),
                  contacts[0].uri, routes, cseq.number, None)
        if response.status < 200:
            dlg.state = DialogState.EARLY
        return dlg

    @classmethod
    def as_uas(cls, request: Request, local_tag: str) -> Dialog:
        """§12.1.1: from a received dialog-creating request."""
        frm, to, cseq = request.from_, request.to, request.cseq
        contacts = request.contacts
        if frm is None or to is None or cseq is None or request.call_id is None:
            raise ValueError("request lacks dialog headers")
        if not frm.tag:
            raise ValueError("dialog needs a From tag")
        if contacts == STAR or len(contacts) != 1:
            raise ValueError("a dialog-creating request needs exactly one Contact")
        if not isinstance(contacts[0].uri, SipUri):
            raise ValueError("a dialog-creating request needs a SIP URI as its Contact")
        return cls(request.call_id, local_tag, frm.tag, _strip_tag(to), _strip_tag(frm),
                   contacts[0].uri, list(request.record_routes),
                   secrets.randbelow(2**20) + 1, cseq.number)

    def new_request(self, method: str, *, body: bytes = b"", content_type: str | None = None,
                    headers: Iterable[HeaderInput] = (), cseq: int | None = None,
                    contact: SipUri | None = None) -> tuple[Request, Addr]:
        """§12.2.1.1: an in-dialog request and the address of its next hop."""
        if method == "ACK":
            number = self.invite_cseq if cseq is None else cseq
        else:
            self.local_seq += 1
            number = self.local_seq
            if method == "INVITE":
                self.invite_cseq = number
        routes = list(self.route_set)
        target = self.remote_target
        if routes and isinstance(routes[0].uri, SipUri) and not routes[0].uri.lr:
            # Strict routing (RFC 2543): the first route becomes the Request-URI.
            ruri = routes[0].uri.replace(headers=[])
            routes = [*routes[1:], NameAddr(target)]
        else:
            ruri = target
        fields: list[HeaderInput] = [("Route", str(r)) for r in routes]
        fields += [("From", str(self.local_uri.with_param("tag", self.local_tag))),
                   ("To", str(self.remote_uri.with_param("tag", self.remote_tag))),
                   ("Call-ID", self.call_id), ("CSeq", f"{number} {method}"),
                   ("Max-Forwards", 70)]
        if contact is not None and method in ("INVITE", "UPDATE"):
            fields.append(("Contact", f"<{contact}>"))
        fields += list(headers)
        if content_type is not None:
            fields.append(("Content-Type", content_type))
        req = Request(method, ruri, fields, body)
        hop = routes[0].uri if routes and ruri is target else ruri
        return req, uri_address(hop)

    def receive_request(self, req: Request) -> None:
        """§12.2.2: CSeq ordering and target refresh. Raises SipError(500) if out of order."""
        cseq = req.cseq
        assert cseq is not None
        if req.method not in ("ACK", "CANCEL"):
            if self.remote_seq is not None and cseq.number < self.remote_seq:
                raise SipError(500, "CSeq out of order")
            self.remote_seq = cseq.number
        if req.method in ("INVITE", "UPDATE"):
            self.refresh_target(req)

    def refresh_target(self, msg: Request | Response) -> None:
        contacts = msg.contacts
        if contacts != STAR and len(contacts) == 1:
            self.remote_target = contacts[0].uri

    def __repr__(self) -> str:
        return f"<Dialog {self.call_id} {self.state.value}>"


def _strip_tag(na: NameAddr) -> NameAddr:
    new = NameAddr(na.uri, na.display_name, na.params.copy())
    new.params.remove("tag")
    return new


AppHandler = Callable[[ServerTransaction, "Dialog | None"], Awaitable[None]]
_call_ids = itertools.count(1)


class UserAgent:
    """A UA core: outgoing calls and messages, incoming ones through 'on_request'.

    on_request(tx, dialog) gets every new request (dialog is None outside dialogs);
    it answers with ua.answer(tx, ...) for INVITE or tx.reply(...) otherwise. Without
    it, INVITE/UPDATE/MESSAGE/OPTIONS/INFO are answered 200.
    """

    def __init__(self, endpoint: SipEndpoint, aor: str, *,
                 on_request: AppHandler | None = None, display_name: str | None = None) -> None:
        self.endpoint = endpoint
        self.aor = NameAddr(parse_uri(aor), display_name)
        host, port = endpoint.advertised
        user = self.aor.uri.user if isinstance(self.aor.uri, SipUri) else None
        self.contact = SipUri(host, user, port=port)
        self.on_request = on_request
        self.on_ack: Callable[[Dialog], None] | None = None  # ACK of our 2xx: UAS confirmed
        # Our 2xx to an INVITE was never acknowledged (§13.3.1.4: end the session, BYE).
        self.on_ack_timeout: Callable[[Dialog], Any] | None = None
        self.dialogs: dict[tuple[str, str, str], Dialog] = {}
        endpoint.handler = self._handle
        endpoint.ack_handler = self._on_ack

    # ---------------------------------------------------------- outgoing
    def _new_call_id(self) -> str:
        return f"{secrets.token_hex(6)}-{next(_call_ids)}@{self.endpoint.advertised[0]}"

    def start_invite(self, target: str | Uri, addr: Addr, *, body: bytes = b"",
                     content_type: str | None = "application/sdp",
                     headers: Iterable[HeaderInput] = (),
                     on_provisional: Callable[[Response], None] | None = None,
                     ) -> ClientTransaction:
        """Sends an initial INVITE; pass the transaction to complete_invite() or cancel()."""
        uri = parse_uri(target) if isinstance(target, str) else target
        fields: list[HeaderInput] = [
            ("From", str(self.aor.with_param("tag", new_tag()))), ("To", f"<{uri}>"),
            ("Call-ID", self._new_call_id()), ("CSeq", "1 INVITE"),
            ("Contact", f"<{self.contact}>"), *headers]
        if body and content_type:
            fields.append(("Content-Type", content_type))
        return self.endpoint.client_transaction(Request("INVITE", uri, fields, body), addr,
                                                on_provisional=on_provisional)

    async def complete_invite(self, tx: ClientTransaction) -> tuple[Response, Dialog | None]:
        """Waits for the final response; on 2xx builds the dialog and ACKs."""
        resp = await tx.final()
        if not 200 <= resp.status < 300:
            return resp, None
        dlg = Dialog.as_uac(tx.request, resp)
        self.dialogs[dlg.id] = dlg
        self._ack(dlg, tx, resp)
        return resp, dlg

    async def invite(self, target: str | Uri, addr: Addr, **kw: object
                     ) -> tuple[Response, Dialog | None]:
        return await self.complete_invite(self.start_invite(target, addr, **kw))  # type: ignore[arg-type]

    def cancel(self, tx: ClientTransaction) -> ClientTransaction:
        return self.endpoint.cancel(tx)

    def _ack(self, dlg: Dialog, tx: ClientTransaction, resp: Response) -> None:
        cseq = tx.request.cseq
        assert cseq is not None
        ack, hop = dlg.new_request("ACK", cseq=cseq.number)
        self.endpoint.send_stateless(ack, hop)
        # A retransmitted 2xx means the ACK was lost: send the same ACK again.
        tx.on_2xx_retransmission = lambda _r: self.endpoint.send_stateless(ack, hop,
                                                                           add_via=False)

    async def request(self, dlg: Dialog, method: str, *, body: bytes = b"",
                      content_type: str | None = None,
                      headers: Iterable[HeaderInput] = ()) -> Response:
        """An in-dialog request (re-INVITE is ACKed; BYE ends the dialog)."""
        if dlg.state is DialogState.TERMINATED:
            raise ValueError(f"dialog {dlg.call_id} is terminated")
        req, hop = dlg.new_request(method, body=body, content_type=content_type,
                                   headers=headers, contact=self.contact)
        tx = self.endpoint.client_transaction(req, hop)
        resp = await tx.final()
        if method == "INVITE" and 200 <= resp.status < 300:
            dlg.refresh_target(resp)
            self._ack(dlg, tx, resp)
        elif method == "UPDATE" and 200 <= resp.status < 300:
            dlg.refresh_target(resp)
        if method == "BYE" or resp.status == 481:
            self._end(dlg)
        return resp

    async def message(self, target: str | Uri, addr: Addr, body: bytes,
                      content_type: str = "text/plain",
                      headers: Iterable[HeaderInput] = ()) -> Response:
        """MESSAGE outside any dialog (RFC 3428)."""
        uri = parse_uri(target) if isinstance(target, str) else target
        req = Request("MESSAGE", uri, [
            ("From", str(self.aor.with_param("tag", new_tag()))), ("To", f"<{uri}>"),
            ("Call-ID", self._new_call_id()), ("CSeq", "1 MESSAGE"), *headers,
            ("Content-Type", content_type)], body)
        return await self.endpoint.request(req, addr)

    def _end(self, dlg: Dialog) -> None:
        dlg.terminate()
        self.dialogs.pop(dlg.id, None)

    # ---------------------------------------------------------- incoming
    def answer(self, tx: ServerTransaction, status: int, reason: str | None = None, *,
               body: bytes = b"", content_type: str | None = None,
               headers: Iterable[HeaderInput] = ()) -> Dialog | None:
        """Answers an initial INVITE; a 2xx creates (and returns) the dialog."""
        req = tx.request
        extra = list(headers)
        dlg = None
        if 200 <= status < 300:
            assert tx.local_tag is not None
            dlg = Dialog.as_uas(req, tx.local_tag)
            self.dialogs[dlg.id] = dlg
            extra = [*(("Record-Route", v) for v in req.values("record-route")),
                     ("Contact", f"<{self.contact}>"), *extra]
        tx.reply(status, reason, headers=extra, body=body, content_type=content_type)
        if dlg is not None:
            self._watch_ack(tx, dlg)
        return dlg

    def _watch_ack(self, tx: ServerTransaction, dlg: Dialog) -> None:
        """Until the INVITE server transaction ends (Timer L): was our 2xx acknowledged?
        The watch ends with the endpoint that owns the transaction."""
        tx.owner.spawn(self._await_ack(tx, dlg))

    async def _await_ack(self, tx: ServerTransaction, dlg: Dialog) -> None:
        await tx.terminated.wait()
        if tx.acked.is_set() or dlg.state is DialogState.TERMINATED:
            return
        log.info("dialog %s: our 2xx was never acknowledged; ending the session",
                 dlg.call_id)
        if self.on_ack_timeout is not None:
            result = self.on_ack_timeout(dlg)
            if asyncio.iscoroutine(result):
                await result

    async def _handle(self, tx: ServerTransaction) -> None:
        req = tx.request
        to, frm = req.to, req.from_
        assert to is not None and frm is not None and req.call_id is not None
        if to.tag is None:
            if req.method == "INVITE":
                try:  # no dialog could be made from it: say so before the app sees it
                    Dialog.as_uas(req, tx.local_tag or new_tag())
                except ValueError as exc:
                    why = str(exc)
                    tx.reply(400, why[:1].upper() + why[1:])
                    return
            if self.on_request is not None:
                await self.on_request(tx, None)
            elif req.method == "INVITE":
                self.answer(tx, 200)
            else:
                tx.reply(200)
            return
        dlg = self.dialogs.get((req.call_id, to.tag, frm.tag or ""))
        if dlg is None:
            tx.reply(481)
            return
        try:
            dlg.receive_request(req)
        except SipError as e:
            tx.reply(e.status, e.reason)
            return
        if req.method == "BYE":
            tx.reply(200)
            self._end(dlg)
            if self.on_request is not None:
                await self.on_request(tx, dlg)
            return
        if self.on_request is not None:
            await self.on_request(tx, dlg)
        if not tx.final_sent:
            contact = [("Contact", f"<{self.contact}>")] if req.method in (
                "INVITE", "UPDATE") else []
            tx.reply(200, headers=contact)
        last = tx.last_response
        if req.method == "INVITE" and last is not None and 200 <= last.status < 300:
            self._watch_ack(tx, dlg)  # a re-INVITE's 2xx needs its ACK too

    def _on_ack(self, req: Request, addr: Addr) -> None:
        to, frm = req.to, req.from_
        if to is None or frm is None or req.call_id is None:
            return
        dlg = self.dialogs.get((req.call_id, to.tag or "", frm.tag or ""))
        if dlg is not None:
            dlg.receive_request(req)
            if self.on_ack is not None:
                self.on_ack(dlg)
