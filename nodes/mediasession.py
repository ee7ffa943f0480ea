"""Fig 2 — the secure data channel of one call: SDP with `a=m2m-key`, media keys derived
from both nonces, the SAs installed by the application itself, and the RTP streams.

    offerer                                  answerer
    INVITE  (SDP: nonce_o, spi_o)     →
                                      ←  200 (SDP: nonce_a, spi_a)     answerer: SAs + receiver
    2xx seen: SAs, receiver, sender          ACK seen: sender
    ... RTP inside ESP, both ways ...
    BYE: sender stops, SAs removed

Symmetric RTP: each side sends from the port it receives on, so the policies name one port
pair per direction (RTP and RTCP ports, DESIGN §2). Without IPsec (open mode) the same code
runs without keys.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from nodes.events import EventLog
from nodes.ipsec.api import ANY, IPPROTO_UDP, Direction, Policy, SecurityAssociation, Selector
from nodes.ipsec.node import NodeIpsec
from nodes.media import Receiver, VideoSender, VoiceSender
from nodes.mediakeys import (
    KeyPair,
    M2mKey,
    MediaKeys,
    MediaSaSet,
    Role,
    derive_media_keys,
    media_key,
    media_sas,
    set_media_key,
)
from nodes.sip.sdp import SessionDescription

log = logging.getLogger("media")

FORMATS = {  # kind -> (m= formats, rtpmap)
    "audio": ("0", "0 PCMU/8000"),
    "video": ("96", "96 H264/90000"),
}


class MediaError(ValueError):
    """The peer's SDP cannot be used (answer 488)."""


class MediaSession:
    def __init__(self, role: Role, local_ip: str, kind: str, events: EventLog,
                 ipsec: NodeIpsec | None, wav: Path | None = None, loop: bool = True,
                 spis_in_use: set[int] | None = None, port: int = 0) -> None:
        if kind not in FORMATS:
            raise MediaError(f"unknown media kind {kind!r} (expected audio or video)")
        self.role, self.local_ip, self.kind = role, local_ip, kind
        self.events, self.ipsec, self.loop = events, ipsec, loop
        self.call_id = ""
        self.receiver = Receiver(port, log=events, wav=wav if kind == "audio" else None,
                                 name=f"rx-{kind}")
        self.local_port = self.receiver.port
        self.local_key = M2mKey.fresh(spis_in_use or set()) if ipsec is not None else None
        self.remote_key: M2mKey | None = None
        self.remote: tuple[str, int] | None = None
        self.saset: MediaSaSet | None = None
        self.keys: MediaKeys | None = None  # given (Fig 3 key reuse) instead of derived
        self.sender: VoiceSender | VideoSender | None = None
        self._receiving = False
        self._rekey_local: M2mKey | None = None  # our fresh key during a rekey
        self._rekey_new: MediaSaSet | None = None
        # What served the old address during a link switch, until it is done (Fig 4).
        self._leftover_sas: list[SecurityAssociation] = []
        self._leftover_policies: list[Policy] = []

    # -- SDP -----------------------------------------------------------------------------------
    def sdp(self) -> bytes:
        fmt, rtpmap = FORMATS[self.kind]
        sd = SessionDescription.parse(
            f"v=0\r\no=- 1 1 IN IP4 {self.local_ip}\r\ns=smig\r\nc=IN IP4 {self.local_ip}\r\n"
            f"t=0 0\r\nm={self.kind} {self.local_port} RTP/AVP {fmt}\r\na=rtpmap:{rtpmap}\r\n")
        if self.local_key is not None:
            set_media_key(sd.media[0], self.local_key)
        return sd.serialize()

    @staticmethod
    def offered_kind(body: bytes) -> str:
        try:
            sd = SessionDescription.parse(body)
        except ValueError as exc:
            raise MediaError(f"bad SDP: {exc}") from None
        if not sd.media or sd.media[0].media not in FORMATS:
            raise MediaError("SDP offers no audio or video section")
        return sd.media[0].media

    def accept_remote(self, body: bytes) -> None:
        """Take the peer's address, port and (with IPsec) m2m-key from its SDP."""
        try:
            sd = SessionDescription.parse(body)
            if not sd.media:
                raise ValueError("no m= section")
            conn = sd.media_connection(0)
            if conn is None:
                raise ValueError("no c= line")
            port = sd.media[0].port
            key = media_key(sd.media[0])
        except ValueError as exc:
            raise MediaError(f"bad SDP: {exc}") from None
        if self.ipsec is not None and key is None:
            raise MediaError("SDP without a=m2m-key: a secure call needs media keys")
        if not 1 <= port <= 65534:
            raise MediaError(f"SDP media port {port} out of range")
        self.remote = (conn.address, port)
        self.remote_key = key

    # -- the channel ------------------------------------------------------------------------------
    def establish(self, call_id: str) -> None:
        """Dialog confirmed: media SAs (SPD and SAD) first, then receive (Fig 2)."""
        assert self.remote is not None
        self.call_id = call_id
        if self.ipsec is not None:
            assert self.local_key is not None and self.remote_key is not None
            offer, answer = self._offer_answer(self.local_key, self.remote_key)
            self.saset = media_sas(self.role, offer, answer, call_id, 0, self.local_ip,
                                   self.local_port, self.remote[0], self.remote[1], self.keys)
            self.ipsec.install(self.saset.sas, self.saset.policies)
            self.events.emit("fig2-media-sas", step="Fig2", call_id=call_id,
                             spi_out=self.saset.outbound.spi, spi_in=self.saset.inbound.spi,
                             local=f"{self.local_ip}:{self.local_port}",
                             remote=f"{self.remote[0]}:{self.remote[1]}")
        if not self._receiving:
            self.receiver.start()
            self._receiving = True

    def start_sending(self) -> None:
        assert self.remote is not None
        if self.sender is not None:
            return
        cls = VoiceSender if self.kind == "audio" else VideoSender
        kwargs: dict[str, Any] = {"loop": self.loop} if self.kind == "audio" else {}
        self.sender = cls(self.remote, local_ip=self.local_ip, log=self.events,
                          name=f"tx-{self.kind}", rtcp_interval=0,
                          sock=self.receiver.rtp_socket, **kwargs)
        self.sender.start()
        self.events.emit("media-started", call_id=self.call_id, kind=self.kind,
                         remote=f"{self.remote[0]}:{self.remote[1]}")

    async def close(self, why: str) -> None:
        """Stop sending, remove the media SAs, stop receiving (BYE, or the node exits)."""
        if self.sender is not None:
            await self.sender.stop()
        # SAs before sockets: with kernel XFRM, ESP still arriving for a closed port is
        # decrypted and answered by a plaintext ICMP port-unreachable that quotes the RTP
        # header; with no SA left the kernel drops it silently.
        if self.saset is not None and self.ipsec is not None:
            policies = list(self.saset.policies)
            if self.remote is not None:  # after a move (Fig 4) the policies name new addresses
                policies += self._in_policies(self.remote[0], self.local_ip)
                policies += self._out_policies(self.local_ip, self.remote[0],
                                               self.saset.outbound.spi)
            self.finish_move()
            self.ipsec.remove(self.saset.sas, policies)
            self.events.emit("fig2-media-sas-removed", call_id=self.call_id, why=why)
            self.saset = None
        if self._receiving:
            self.receiver.close()
            self._receiving = False
        else:
            self.receiver.rtp_socket.close()

    def _offer_answer(self, mine: M2mKey, theirs: M2mKey) -> tuple[M2mKey, M2mKey]:
        return (mine, theirs) if self.role is Role.OFFERER else (theirs, mine)

    # -- Fig 3: moving the channel to other terminals -----------------------------------------
    def export(self) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """Step (1)/(3): the security information exchanged at call start and the keys in
        use, as they cross the network (inside the ESP-protected signalling)."""
        assert self.local_key is not None and self.remote_key is not None and self.call_id
        offer, answer = self._offer_answer(self.local_key, self.remote_key)
        keys = self.keys or derive_media_keys(offer, answer, self.call_id, 0)
        security = {"offer": offer.serialize(), "answer": answer.serialize()}
        return security, {
            "offer-to-answer": {"enc": keys.offer_to_answer.enc_key.hex(),
                                "auth": keys.offer_to_answer.auth_key.hex()},
            "answer-to-offer": {"enc": keys.answer_to_offer.enc_key.hex(),
                                "auth": keys.answer_to_offer.auth_key.hex()},
        }

    def adopt(self, security: dict[str, str], keys: dict[str, dict[str, str]],
              remote: tuple[str, int]) -> None:
        """Step (6) input: the old session's security information and keys, the new peer."""
        try:
            offer = M2mKey.parse(security["offer"])
            answer = M2mKey.parse(security["answer"])
            pairs = [KeyPair(bytes.fromhex(keys[d]["enc"]), bytes.fromhex(keys[d]["auth"]))
                     for d in ("offer-to-answer", "answer-to-offer")]
        except (KeyError, TypeError, ValueError) as exc:
            raise MediaError(f"unusable security information or keys: {exc!r}") from None
        self.local_key, self.remote_key = ((offer, answer) if self.role is Role.OFFERER
                                           else (answer, offer))
        self.keys = MediaKeys(*pairs)
        self.remote = remote

    # -- Fig 3 step (9): rekey without a media gap ----------------------------------------------
    def rekey_offer(self, spis_in_use: set[int]) -> M2mKey:
        self._rekey_local = M2mKey.fresh(spis_in_use | self.spis())
        return self._rekey_local

    def _new_saset(self, theirs: M2mKey) -> MediaSaSet:
        assert self._rekey_local is not None and self.remote is not None
        offer, answer = self._offer_answer(self._rekey_local, theirs)
        return media_sas(self.role, offer, answer, self.call_id, 0, self.local_ip,
                         self.local_port, self.remote[0], self.remote[1])

    def rekey_answer(self, theirs: M2mKey, spis_in_use: set[int]) -> M2mKey:
        """Peer's side, first: our fresh key, and the new inbound SA before anything else."""
        mine = self.rekey_offer(spis_in_use)
        self._rekey_new = self._new_saset(theirs)
        assert self.ipsec is not None
        self.ipsec.install([self._rekey_new.inbound], [])
        return mine

    def rekey_commit(self, theirs: M2mKey) -> None:
        """Initiator, on the answer: new inbound and outbound SAs, outbound traffic moved to
        the new SA, the reused outbound SA deleted (lifetime 0 is explicit deletion)."""
        assert self.ipsec is not None and self.saset is not None
        new = self._new_saset(theirs)
        self.ipsec.install([new.inbound, new.outbound], [])
        self.ipsec.update_policies(p for p in new.policies if p.spi is not None)
        self.ipsec.remove([self.saset.outbound], [])
        self._rekey_new = new

    def rekey_switch_outbound(self) -> None:
        """Peer, on commit: outbound moves to the new SA; both reused SAs are deleted."""
        assert self.ipsec is not None and self.saset is not None
        new = self._rekey_new
        assert new is not None
        self.ipsec.install([new.outbound], [])
        self.ipsec.update_policies(p for p in new.policies if p.spi is not None)
        self.ipsec.remove([self.saset.outbound, self.saset.inbound], [])
        self.saset, self._rekey_new, self._rekey_local = new, None, None
        self.keys = None

    def rekey_finish(self) -> None:
        """Initiator, on done: the reused inbound SA goes too."""
        assert self.ipsec is not None and self.saset is not None
        new = self._rekey_new
        assert new is not None
        self.ipsec.remove([self.saset.inbound], [])
        self.saset, self._rekey_new, self._rekey_local = new, None, None
        self.keys = None

    # -- Fig 4: the same keys on another address ----------------------------------------------
    def _port_pairs(self) -> list[tuple[int, int]]:
        assert self.remote is not None
        lp, rp = self.local_port, self.remote[1]
        return [(lp, rp), (lp + 1, rp + 1)]

    def _in_policies(self, remote_ip: str, local_ip: str) -> list[Policy]:
        return [Policy(Selector(remote_ip, local_ip, IPPROTO_UDP, rp, lp), Direction.IN,
                       remote_ip, local_ip) for lp, rp in self._port_pairs()]

    def _out_policies(self, local_ip: str, remote_ip: str, spi: int) -> list[Policy]:
        return [Policy(Selector(local_ip, remote_ip, IPPROTO_UDP, lp, rp), Direction.OUT,
                       local_ip, remote_ip, spi=spi) for lp, rp in self._port_pairs()]

    def prepare_move_local(self, new_ip: str) -> None:
        """Moving side, first (before the peer sends there): receive on `new_ip` too — a copy
        of the inbound SA at the new address, and IN policies for it."""
        if self.ipsec is None or self.saset is None:
            return
        assert self.remote is not None
        inbound = replace(self.saset.inbound, dst=new_ip, seq=0, replay_top=0, stats={},
                          selector=Selector(ANY, new_ip, IPPROTO_UDP))
        self.ipsec.install([inbound], self._in_policies(self.remote[0], new_ip))
        self._leave(self.saset.inbound, self._in_policies(self.remote[0], self.local_ip))
        self.saset = replace(self.saset, inbound=inbound)

    def move_local(self, new_ip: str) -> None:
        """Moving side: outbound SA re-addressed with its sequence number kept, policies for
        the new source, then the sender — no packet is sent in between (same loop)."""
        assert self.remote is not None
        old_ip = self.local_ip
        if self.ipsec is not None and self.saset is not None:
            out = self.saset.outbound
            moved = self.ipsec.move_sa(out, new_ip, out.dst,
                                       Selector(new_ip, out.dst, IPPROTO_UDP))
            self.ipsec.add_policies(self._out_policies(new_ip, self.remote[0], moved.spi))
            self.saset = replace(self.saset, outbound=moved)
        if self.sender is not None:
            self.sender.retarget(self.remote, local_ip=new_ip)
        if self.ipsec is not None and self.saset is not None:
            # The old source's OUT policies stay until the switch is done: a packet the
            # userspace engine has not encrypted yet still finds its way (and the moved SA).
            self._leave(None, self._out_policies(old_ip, self.remote[0],
                                                 self.saset.outbound.spi))
        self.local_ip = new_ip
        self.events.emit("media-moved", session=self.call_id, side="local", old=old_ip,
                         new=new_ip)

    def move_remote(self, new_ip: str) -> None:
        """Peer side: accept the peer from its new address, send there (outbound SA moved,
        sequence kept), stop sending to the old one."""
        assert self.remote is not None
        old_ip, port = self.remote
        if self.ipsec is not None and self.saset is not None:
            self.ipsec.add_policies(self._in_policies(new_ip, self.local_ip))
            out = self.saset.outbound
            moved = self.ipsec.move_sa(out, out.src, new_ip,
                                       Selector(out.src, new_ip, IPPROTO_UDP))
            self.ipsec.add_policies(self._out_policies(self.local_ip, new_ip, moved.spi))
            self.saset = replace(self.saset, outbound=moved)
            self._leave(None, [*self._in_policies(old_ip, self.local_ip),
                               *self._out_policies(self.local_ip, old_ip, moved.spi)])
        self.remote = (new_ip, port)
        if self.sender is not None:
            self.sender.retarget(self.remote)
        self.events.emit("media-moved", session=self.call_id, side="remote", old=old_ip,
                         new=new_ip)

    def renegotiate(self, role: Role, mine: M2mKey, theirs: M2mKey,
                    local_ip: str | None = None, remote: tuple[str, int] | None = None) -> None:
        """Baseline B2 (classic SIP mobility): fresh keys and SPIs on the new address from a
        re-INVITE's offer/answer; then the old SAs go."""
        assert self.remote is not None
        old_sas = list(self.saset.sas) if self.saset else []
        old_pols: list[Policy] = []
        if self.saset is not None:
            old_pols = [*self.saset.policies, *self._in_policies(self.remote[0], self.local_ip),
                        *self._out_policies(self.local_ip, self.remote[0],
                                            self.saset.outbound.spi)]
        self.role, self.local_key, self.remote_key, self.keys = role, mine, theirs, None
        if local_ip is not None:
            self.local_ip = local_ip
        if remote is not None:
            self.remote = remote
        if self.ipsec is not None:
            offer, answer = self._offer_answer(mine, theirs)
            self.saset = media_sas(role, offer, answer, self.call_id, 0, self.local_ip,
                                   self.local_port, self.remote[0], self.remote[1])
            self.ipsec.install(self.saset.sas, self.saset.policies)
        if self.sender is not None:
            self.sender.retarget(self.remote, local_ip=local_ip)
        if self.ipsec is not None:
            keep = set(self.saset.policies) if self.saset else set()
            self.ipsec.remove(old_sas, [p for p in old_pols if p not in keep])
        self.events.emit("media-renegotiated", session=self.call_id,
                         local=self.local_ip, remote=f"{self.remote[0]}:{self.remote[1]}")

    def _leave(self, sa: SecurityAssociation | None, policies: list[Policy]) -> None:
        """Keep what served the old address until the switch is done (make before break)."""
        if sa is not None:
            self._leftover_sas.append(sa)
        self._leftover_policies += policies

    def finish_move(self) -> None:
        """Both ends switched: what served the old address goes."""
        if self.ipsec is not None and (self._leftover_sas or self._leftover_policies):
            self.ipsec.remove(self._leftover_sas, self._leftover_policies)
        self._leftover_sas, self._leftover_policies = [], []

    def spis(self) -> set[int]:
        return {sa.spi for sa in self.saset.sas} if self.saset else set()

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "local": f"{self.local_ip}:{self.local_port}",
            "remote": f"{self.remote[0]}:{self.remote[1]}" if self.remote else None,
            "spi_out": self.saset.outbound.spi if self.saset else None,
            "spi_in": self.saset.inbound.spi if self.saset else None,
            "rx": self.receiver.status(),
            "tx": self.sender.state() if self.sender else None,
        }
