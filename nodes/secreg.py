"""Fig 1 — pre-shared-key IPsec-m2ms registration (RFC 3329 sec-agree, TS 33.203 sequence).

    terminal                                              proxy
    REGISTER (5060, Security-Client)                  →                        step 1
                                                      ←  401 (nonce, Security-Server) step 2
    both: keys = HKDF(PSK, nonce, SPIs); four transport-mode ESP SAs            step 3
    REGISTER (port-c → port-s, in ESP; Security-Verify, Digest)  →              step 4
                                                      ←  200 (in ESP)          step 5

`SecRegServer` is the proxy's half, `SecRegClient` the terminal's. A wrong PSK makes the keys
differ: the protected REGISTER fails ESP integrity and never reaches SIP; the terminal's
Timer F ends the attempt and both sides remove the pending SAs (DESIGN §2).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nodes.events import EventLog
from nodes.ipsec.api import IPsecError
from nodes.ipsec.node import NodeIpsec
from nodes.labconfig import Credentials, LabConfig
from nodes.mediakeys import new_spi
from nodes.sip import digest
from nodes.sip.endpoint import SipEndpoint
from nodes.sip.message import Request, Response
from nodes.sip.secagree import (
    Agreement,
    SaSet,
    SecAgreeError,
    SecurityMechanism,
    SecurityVerifyMismatch,
    Side,
    agreement,
    choose_mechanism,
    derive_registration_keys,
    offer,
    parse_mechanisms,
    registration_sas,
    serialize_mechanisms,
    verify_header_values,
)
from nodes.sip.transaction import ServerTransaction, TransactionTimeout
from nodes.sip.transport import Addr, UdpTransport
from nodes.sip.uri import SipUri

log = logging.getLogger("secreg")

SEC_AGREE = "sec-agree"
SERVER_PORT_S = 5064  # the proxy's protected server port (receives terminals' requests)
SERVER_PORT_C = 5066  # the proxy's protected client port (sends requests to terminals)
LINGER = 0.5  # seconds SAs outlive the last answer sent through them
# Every challenge installs four SAs before the client has proved anything, so how many may
# wait for their protected REGISTER is bounded: per client address (a new attempt replaces
# the oldest; a terminal has one in flight per interface) and in all (beyond that: 503).
# Unbounded, one host's flood of REGISTERs made the SA tables, and every SPD change with
# them, slow for everyone.
MAX_PENDING_PER_IP = 4
MAX_PENDING = 32


class RegistrationError(Exception):
    """A registration attempt failed; the message says why, for the operator."""


def _install(ipsec: NodeIpsec, saset: SaSet) -> None:
    ipsec.install(saset.sas, saset.policies)


def _remove(ipsec: NodeIpsec, saset: SaSet) -> None:
    ipsec.remove(saset.sas, saset.policies)


# ------------------------------------------------------------------------------ proxy side
@dataclass
class Pending:
    terminal: str
    agreed: Agreement
    saset: SaSet
    sent: list[SecurityMechanism]
    challenge: digest.DigestChallenge
    timer: asyncio.TimerHandle | None = None


@dataclass
class Association:
    """An established registration channel: its SAs, keyed by the client's (ip, port-c)."""

    terminal: str
    agreed: Agreement
    saset: SaSet
    created_ns: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class SecRegServer:
    def __init__(self, ipsec: NodeIpsec, config: LabConfig, creds: Credentials,
                 server_ip: str, events: EventLog, pending_timeout: float,
                 port_s: int = SERVER_PORT_S, port_c: int = SERVER_PORT_C) -> None:
        self.ipsec, self.config, self.creds = ipsec, config, creds
        self.server_ip, self.events = server_ip, events
        self.pending_timeout = pending_timeout
        self.port_s, self.port_c = port_s, port_c
        self.realm = config.domain
        self.pending: dict[Addr, Pending] = {}
        self.assocs: dict[Addr, Association] = {}
        self._lingering: dict[int, tuple[asyncio.TimerHandle, SaSet]] = {}

    def _spis_in_use(self) -> set[int]:
        """SPIs of our inbound SAs, lingering ones included (a new pair must differ)."""
        return {spi for dst, spi in self._installed() if dst == self.server_ip}

    def _installed(self, skip: Iterable[Pending] = ()) -> set[tuple[str, int]]:
        """(dst, spi) of every SA this server has installed, but those of `skip`."""
        skipped = {id(p.saset) for p in skip}
        sasets = [e.saset for e in [*self.pending.values(), *self.assocs.values()]
                  if id(e.saset) not in skipped]
        sasets += [saset for _, saset in self._lingering.values()]
        return {(sa.dst, sa.spi) for saset in sasets for sa in saset.sas}

    def _displaced(self, key: Addr) -> list[Pending]:
        """The pending attempts a new challenge for `key` replaces: one from the same
        (ip, port-c), and the oldest from the same ip beyond MAX_PENDING_PER_IP."""
        same_key = self.pending.get(key)
        same_ip = [p for k, p in self.pending.items() if k[0] == key[0] and k != key]
        excess = len(same_ip) - (MAX_PENDING_PER_IP - 1)
        return ([same_key] if same_key else []) + same_ip[:max(0, excess)]

    def challenge(self, tx: ServerTransaction) -> None:
        """Fig 1 steps 1-2: REGISTER with Security-Client → pending SAs + 401."""
        req = tx.request
        to = req.to
        term = self.config.terminal_of(str(to.uri)) if to else None
        psk = self.creds.psk(term.name) if term else None
        if term is None or psk is None:
            self._refuse(tx, 403, "Unknown terminal or no credentials")
            return
        try:
            offered = parse_mechanisms(req.values("security-client"), "Security-Client")
        except ValueError as exc:
            self._refuse(tx, 400, f"Malformed Security-Client ({exc})")
            return
        if not offered:
            self._refuse(tx, 494, "Security Agreement Required", require=True)
            return
        try:
            chosen = choose_mechanism(offered)
        except SecAgreeError as exc:
            self._refuse(tx, 494, str(exc), require=True)
            return
        assert chosen.alg is not None and chosen.ealg is not None
        in_use = self._spis_in_use()
        spi_c = new_spi(in_use)
        spi_s = new_spi(in_use | {spi_c})
        mech = SecurityMechanism.ipsec(chosen.alg, chosen.ealg, spi_c, spi_s, self.port_c,
                                       self.port_s)
        client_ip = tx.source[0]
        try:
            agreed = agreement(offered, mech, client_ip, self.server_ip)
        except (SecAgreeError, ValueError) as exc:
            self._refuse(tx, 400, f"Unusable Security-Client ({exc})")
            return
        key = (client_ip, agreed.client.port_c)
        displaced = self._displaced(key)
        if len(self.pending) - len(displaced) >= MAX_PENDING:
            retry = math.ceil(self.pending_timeout)
            self._refuse(tx, 503, "Too many registrations in progress",
                         headers=[("Retry-After", str(retry))])
            return
        challenge = digest.DigestChallenge.new(self.realm)
        keys = derive_registration_keys(psk, challenge.nonce_bytes, agreed)
        saset = registration_sas(agreed, keys, Side.SERVER)
        installed = self._installed(skip=displaced)
        clash = [sa.spi for sa in saset.sas if (sa.dst, sa.spi) in installed]
        if clash:  # the client's SPIs name SAs of another of its registrations
            self._refuse(tx, 400, "Security-Client SPIs already in use",
                         detail=f"SPIs {clash} toward {client_ip} belong to another "
                         "registration (a new attempt needs fresh SPIs)")
            return
        for old in displaced:
            self._forget_pending(old)
        try:
            _install(self.ipsec, saset)  # all or nothing
        except IPsecError as exc:
            log.error("cannot install the SAs for %s from %s: %s", term.name, client_ip, exc)
            self._refuse(tx, 500, "Cannot install the security associations",
                         detail=str(exc))
            return
        pend = Pending(term.name, agreed, saset, [mech], challenge)
        pend.timer = asyncio.get_running_loop().call_later(self.pending_timeout,
                                                           self._expire, key)
        self.pending[key] = pend
        self.events.emit("fig1-challenge", step="Fig1-2", terminal=term.name,
                         client=f"{client_ip}:{agreed.client.port_c}",
                         spis={"client": [agreed.client.spi_c, agreed.client.spi_s],
                               "server": [spi_c, spi_s]}, alg=agreed.alg, ealg=agreed.ealg)
        tx.reply(401, headers=[("WWW-Authenticate", challenge.serialize()),
                               ("Security-Server", serialize_mechanisms([mech]))])

    def verify(self, tx: ServerTransaction) -> Pending | None:
        """Fig 1 step 4 at the proxy: the protected REGISTER. Returns the pending entry when
        Security-Verify and Digest are right (the caller binds and promotes it); otherwise
        answers, removes the pending SAs and returns None."""
        key = tx.source
        pend = self.pending.pop(key)
        if pend.timer is not None:
            pend.timer.cancel()
        try:
            return self._check_protected(tx, pend)
        except Exception:  # a bug, not the client's input: its SAs must not stay behind
            log.exception("verifying the protected REGISTER from %s:%d failed", *key)
            return self._fail(tx, pend, 500, "Server Internal Error", "verification failed")

    def _check_protected(self, tx: ServerTransaction, pend: Pending) -> Pending | None:
        req = tx.request
        try:
            verify_header_values(req.values("security-verify"), pend.sent)
            creds = digest.DigestCredentials.parse(req.get("authorization") or "")
        except SecurityVerifyMismatch as exc:
            return self._fail(tx, pend, 494, "Security-Verify mismatch", str(exc))
        except ValueError as exc:
            return self._fail(tx, pend, 400, "Malformed Security-Verify or Authorization",
                              str(exc))
        psk = self.creds.psk(pend.terminal)
        assert psk is not None
        why = digest.check(creds, pend.challenge, password=digest.password_from_psk(psk),
                           method="REGISTER")
        aor = self.config.aor(pend.terminal)
        if why is None and creds.username != aor:
            why = f"username {creds.username!r} is not the registering AOR"
        to = req.to
        if why is None and (to is None or not isinstance(to.uri, SipUri) or
                            to.uri.aor() != aor):  # the channel would bind someone else
            why = f"To {to.uri if to else None} is not the authenticated terminal {aor}"
        if why is not None:
            return self._fail(tx, pend, 403, "Forbidden", why)
        return pend

    def promote(self, key: Addr, pend: Pending, now_ns: int
                ) -> list[tuple[Addr, Association]]:
        """After the 200: the pending channel is established. Older channels of the same
        terminal from the same address are returned for removal (re-registration: the new
        SAs already carried the 200, so the old ones can go)."""
        stale = [k for k, a in self.assocs.items()
                 if a.terminal == pend.terminal and k[0] == key[0] and k != key]
        self.assocs[key] = Association(pend.terminal, pend.agreed, pend.saset, now_ns)
        self.events.emit("fig1-registered", step="Fig1-5", terminal=pend.terminal,
                         client=f"{key[0]}:{key[1]}")
        return [(k, self.assocs.pop(k)) for k in stale]

    def drop_assoc(self, key: Addr, why: str, after_answer: bool = False) -> None:
        assoc = self.assocs.pop(key, None)
        if assoc is not None:
            if after_answer:
                self._remove_soon(assoc.saset)
            else:
                _remove(self.ipsec, assoc.saset)
            self.events.emit("sa-removed", terminal=assoc.terminal, why=why,
                             client=f"{key[0]}:{key[1]}")

    def _remove_soon(self, saset: SaSet) -> None:
        """The answer just sent still has to leave through these SAs (the userspace engine
        encrypts on its own thread): remove them a moment later, not under its feet."""
        loop = asyncio.get_running_loop()
        handle = loop.call_later(LINGER, self._remove_now, saset)
        self._lingering[id(saset)] = (handle, saset)

    def _remove_now(self, saset: SaSet) -> None:
        self._lingering.pop(id(saset), None)
        _remove(self.ipsec, saset)

    def remove(self, assoc: Association, why: str) -> None:
        _remove(self.ipsec, assoc.saset)
        self.events.emit("sa-removed", terminal=assoc.terminal, why=why)

    def close(self) -> None:
        for pend in self.pending.values():
            if pend.timer is not None:
                pend.timer.cancel()
        self.pending.clear()
        for handle, _ in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
        self.assocs.clear()  # the backend's close removes the SAs themselves

    def _expire(self, key: Addr) -> None:
        pend = self.pending.pop(key, None)
        if pend is not None:
            self._drop_pending(pend)
            self.events.emit("fig1-timeout", terminal=pend.terminal,
                             client=f"{key[0]}:{key[1]}",
                             why="no protected REGISTER (wrong PSK fails ESP integrity)")

    def discard_pending(self, pend: Pending) -> None:
        """A verified attempt the registrar refused: its answer went out on these SAs."""
        if pend.timer is not None:
            pend.timer.cancel()
        self._remove_soon(pend.saset)

    def _drop_pending(self, pend: Pending) -> None:
        if pend.timer is not None:
            pend.timer.cancel()
        _remove(self.ipsec, pend.saset)

    def _forget_pending(self, pend: Pending) -> None:
        """A pending attempt replaced by a newer one: its SAs go at once (no answer of ours
        travels on them)."""
        key = (pend.agreed.client.ip, pend.agreed.client.port_c)
        if self.pending.get(key) is pend:
            del self.pending[key]
        self._drop_pending(pend)
        self.events.emit("fig1-replaced", terminal=pend.terminal,
                         client=f"{key[0]}:{key[1]}", why="a newer attempt from this address")

    def _fail(self, tx: ServerTransaction, pend: Pending, status: int, reason: str,
              detail: str) -> None:
        self._refuse(tx, status, reason, detail=detail, terminal=pend.terminal)
        if pend.timer is not None:
            pend.timer.cancel()
        self._remove_soon(pend.saset)  # after the answer: it travels on these SAs
        return None

    def _refuse(self, tx: ServerTransaction, status: int, reason: str, *,
                require: bool = False, detail: str | None = None,
                terminal: str | None = None, headers: list[tuple[str, str]] | None = None
                ) -> None:
        self.events.emit("register-refused", status=status, reason=reason, detail=detail,
                         terminal=terminal, source=list(tx.source))
        log.info("REGISTER from %s:%d refused: %d %s%s", *tx.source, status, reason,
                 f" ({detail})" if detail else "")
        extra = [("Require", SEC_AGREE)] if require else []
        tx.reply(status, reason, headers=[*extra, *(headers or [])])


# ---------------------------------------------------------------------------- terminal side
@dataclass
class ClientChannel:
    """The terminal's protected channel: SAs and the two protected endpoints."""

    agreed: Agreement
    saset: SaSet
    ep_c: SipEndpoint  # sends requests (port-c → proxy port-s)
    ep_s: SipEndpoint  # receives requests (proxy port-c → port-s)

    @property
    def proxy_hop(self) -> Addr:
        return self.agreed.server.ip, self.agreed.server.port_s


class SecRegClient:
    def __init__(self, ipsec: NodeIpsec, aor: str, psk: bytes, local_ip: str, proxy_ip: str,
                 events: EventLog, make_endpoint: Callable[[UdpTransport], SipEndpoint]) -> None:
        self.ipsec, self.aor, self._psk = ipsec, aor, psk
        self.local_ip, self.proxy_ip = local_ip, proxy_ip
        self.events = events
        self.make_endpoint = make_endpoint

    def __repr__(self) -> str:
        return f"SecRegClient({self.aor}, psk=<hidden>)"

    async def register(self, plain: SipEndpoint, build: Callable[[Addr], Request],
                       expires: int, old_spis: set[int]) -> tuple[ClientChannel, Response]:
        """Fig 1 as the terminal: returns the established channel and the final 200.

        `build(contact_addr)` makes each REGISTER (From/To/Call-ID/CSeq/Contact/Expires/body).
        Raises RegistrationError with the reason; nothing stays installed on failure."""
        ep_c = self.make_endpoint(await UdpTransport.create(self.local_ip, 0))
        ep_s = self.make_endpoint(await UdpTransport.create(self.local_ip, 0))
        channel: ClientChannel | None = None
        try:
            port_c, port_s = ep_c.local_addr[1], ep_s.local_addr[1]
            spi_c = new_spi(old_spis)
            spi_s = new_spi(old_spis | {spi_c})
            offered = offer(spi_c, spi_s, port_c, port_s)
            # Step 1: unprotected REGISTER with Security-Client.
            req = build((self.local_ip, port_s))
            self._sec_headers(req, ("Security-Client", serialize_mechanisms(offered)))
            self.events.emit("fig1-register", step="Fig1-1", expires=expires)
            resp = await self._send(plain, req, (self.proxy_ip, 5060), "the proxy")
            if resp.status != 401:
                raise RegistrationError(f"registration refused: {resp.status} {resp.reason}")
            # Steps 2-3: keys from the PSK and the nonce, four SAs.
            try:
                challenge = digest.DigestChallenge.parse(resp.get("www-authenticate") or "")
                server = parse_mechanisms(resp.values("security-server"), "Security-Server")
                chosen = choose_mechanism(server)
                agreed = agreement(offered, chosen, self.local_ip, self.proxy_ip)
            except (ValueError, SecAgreeError) as exc:
                raise RegistrationError(f"registration failed: bad 401 ({exc})") from None
            keys = derive_registration_keys(self._psk, challenge.nonce_bytes, agreed)
            saset = registration_sas(agreed, keys, Side.CLIENT)
            _install(self.ipsec, saset)
            channel = ClientChannel(agreed, saset, ep_c, ep_s)
            self.events.emit("fig1-sas", step="Fig1-3", spis=[sa.spi for sa in saset.sas],
                             proxy=f"{self.proxy_ip}:{agreed.server.port_s}")
            # Step 4: the protected REGISTER.
            req = build((self.local_ip, port_s))
            uri = str(req.uri)
            auth = digest.authorize(challenge, username=self.aor,
                                    password=digest.password_from_psk(self._psk),
                                    method="REGISTER", uri=uri)
            self._sec_headers(req, ("Security-Client", serialize_mechanisms(offered)),
                              ("Security-Verify", serialize_mechanisms(server)),
                              ("Authorization", auth.serialize()))
            self.events.emit("fig1-protected-register", step="Fig1-4")
            resp = await self._send(ep_c, req, channel.proxy_hop, "the protected channel")
            if resp.status != 200:
                raise RegistrationError(f"registration refused: {resp.status} {resp.reason}")
            self.events.emit("fig1-registered", step="Fig1-5")
            return channel, resp
        except BaseException:
            if channel is not None:
                _remove(self.ipsec, channel.saset)
            await ep_c.close()
            await ep_s.close()
            raise

    async def unregister(self, channel: ClientChannel, build: Callable[[Addr], Request]
                         ) -> Response | None:
        """REGISTER Expires: 0 over the channel; its SAs go after the answer (or timeout)."""
        req = build((self.local_ip, channel.ep_s.local_addr[1]))
        self._sec_headers(req)
        try:
            return await channel.ep_c.request(req, channel.proxy_hop)
        except TransactionTimeout:
            return None
        finally:
            await self.close_channel(channel)

    async def close_channel(self, channel: ClientChannel) -> None:
        _remove(self.ipsec, channel.saset)
        await channel.ep_c.close()
        await channel.ep_s.close()

    @staticmethod
    def _sec_headers(req: Request, *extra: tuple[str, str]) -> None:
        req.add("Require", SEC_AGREE)
        req.add("Proxy-Require", SEC_AGREE)
        req.add("Supported", SEC_AGREE)
        for name, value in extra:
            req.add(name, value)

    @staticmethod
    async def _send(ep: SipEndpoint, req: Request, addr: Addr, where: str) -> Response:
        try:
            return await ep.request(req, addr)
        except TransactionTimeout:
            if where == "the protected channel":
                raise RegistrationError(
                    "registration failed: no answer on the protected channel — wrong PSK?"
                ) from None
            raise RegistrationError(f"registration failed: no answer from {where}") from None
