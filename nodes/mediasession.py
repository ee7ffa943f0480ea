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

Whatever comes from the peer (SDP, keys and addresses relayed by the SMS) is checked in full
before anything changes: a `MediaError` says what is unusable and leaves the session as it was.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from nodes.events import EventLog
from nodes.ipsec.api import (
    ANY,
    IPPROTO_UDP,
    Direction,
    IPsecError,
    Policy,
    SecurityAssociation,
    Selector,
)
from nodes.ipsec.node import NodeIpsec
from nodes.media import Receiver, VideoSender, VoiceSender
from nodes.mediakeys import (
    AUTH_KEY_LENGTH,
    ENC_KEY_LENGTH,
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


def _shown(text: object) -> str:
    """A peer's value in an error message: short, printable."""
    return repr(text if not isinstance(text, str) else text[:64])


def check_media_address(address: object, what: str = "media") -> str:
    """`address` if media can be sent there: a unicast IPv4 literal (no host names — there
    is no resolver in the lab —, no IPv6, no 0.0.0.0, broadcast or multicast)."""
    try:
        ip = ipaddress.IPv4Address(address)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise MediaError(f"{what} address {_shown(address)} is not an IPv4 address") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:  # 255.255.255.255: reserved
        raise MediaError(f"{what} address {ip} is not a unicast address")
    return str(ip)


def check_media_port(port: object, what: str = "media") -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65534:
        raise MediaError(f"{what} port {_shown(port)} out of range (1..65534; RTCP is RTP+1)")
    return port


def remote_media(body: bytes, kind: str | None = None
                 ) -> tuple[str, tuple[str, int], M2mKey | None]:
    """The peer's media from its SDP: (kind, (address, RTP port), m2m-key or None). The first
    m= section is the call's; `kind`, if given, is the one it must have."""
    try:
        sd = SessionDescription.parse(body)
        if not sd.media:
            raise ValueError("no m= section")
        media = sd.media[0]
        conn = sd.media_connection(0)
        if conn is None:
            raise ValueError("no c= line")
        port = media.port
        key = media_key(media)
    except ValueError as exc:
        raise MediaError(f"bad SDP: {exc}") from None
    if media.media not in FORMATS:
        raise MediaError(f"SDP offers no audio or video section (m={_shown(media.media)})")
    if kind is not None and media.media != kind:
        raise MediaError(f"SDP media is {media.media}, the call is {kind}")
    if port == 0:
        raise MediaError("SDP refuses the media stream (port 0)")
    check_media_port(port, "SDP media")
    if (conn.nettype, conn.addrtype) != ("IN", "IP4"):
        raise MediaError(f"SDP c= must be IN IP4, got {_shown(f'{conn.nettype} {conn.addrtype}')}")
    address = check_media_address(conn.address, "SDP c=")
    return media.media, (address, port), key


def reused_keys(security: object, keys: object) -> tuple[M2mKey, M2mKey, MediaKeys]:
    """Fig 3: the security information (both m2m-keys) and the keys that crossed the network
    in a switch, parsed and checked (MediaError says what is unusable)."""
    try:
        offer = M2mKey.parse(_text(security, "security", "offer"))
        answer = M2mKey.parse(_text(security, "security", "answer"))
        pairs = [_key_pair(keys, d, offer) for d in ("offer-to-answer", "answer-to-offer")]
    except ValueError as exc:
        raise MediaError(f"unusable security information or keys: {exc}") from None
    if (offer.ealg, offer.alg) != (answer.ealg, answer.alg):
        raise MediaError(f"security information: answer uses {answer.ealg}/{answer.alg}, "
                         f"offer {offer.ealg}/{offer.alg}")
    return offer, answer, MediaKeys(*pairs)


def _text(obj: object, what: str, name: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be an object")
    value = obj.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{what}.{name} must be a string")
    return value


def _key_pair(keys: object, direction: str, offer: M2mKey) -> KeyPair:
    """One direction's keys (hex), of the lengths the offer's algorithms use."""
    if not isinstance(keys, dict):
        raise ValueError("keys must be an object")
    enc_hex = _text(keys.get(direction), f"keys.{direction}", "enc")
    auth_hex = _text(keys.get(direction), f"keys.{direction}", "auth")
    try:
        enc, auth = bytes.fromhex(enc_hex), bytes.fromhex(auth_hex)
    except ValueError:
        raise ValueError(f"keys.{direction}: keys must be hex") from None
    if len(enc) != ENC_KEY_LENGTH[offer.ealg] or len(auth) != AUTH_KEY_LENGTH[offer.alg]:
        raise ValueError(f"keys.{direction}: {offer.ealg}/{offer.alg} takes "
                         f"{ENC_KEY_LENGTH[offer.ealg]}+{AUTH_KEY_LENGTH[offer.alg]} bytes, "
                         f"got {len(enc)}+{len(auth)}")
    return KeyPair(enc, auth)


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
        self._rekey_phase: str | None = None  # offered/committed (initiator), answered (peer)
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
        """The media an offer asks for; MediaError if the offer is unusable at all."""
        return remote_media(body)[0]

    def accept_remote(self, body: bytes) -> None:
        """Take the peer's address, port and (with IPsec) m2m-key from its SDP, all checked
        first: MediaError says what is wrong and nothing changes."""
        _, remote, key = remote_media(body, self.kind)
        if remote[0] == self.local_ip:
            raise MediaError(f"SDP c= {remote[0]} is this terminal's own address")
        if self.ipsec is not None:
            if key is None:
                raise MediaError("SDP without a=m2m-key: a secure call needs media keys")
            self.check_algorithms(key)
        self.remote = remote
        self.remote_key = key

    def check_algorithms(self, theirs: M2mKey) -> None:
        """The peer's m2m-key must use the algorithms of ours (both derive one set of keys
        for both directions, DESIGN §2)."""
        mine = self.local_key
        if mine is not None and (theirs.ealg, theirs.alg) != (mine.ealg, mine.alg):
            raise MediaError(f"m2m-key uses {theirs.ealg}/{theirs.alg}; this terminal "
                             f"uses {mine.ealg}/{mine.alg}")

    # -- the channel ------------------------------------------------------------------------------
    def establish(self, call_id: str) -> None:
        """Dialog confirmed: media SAs (SPD and SAD) first, then receive (Fig 2). MediaError
        if the SAs cannot be built or installed; then nothing is installed."""
        assert self.remote is not None
        if self.ipsec is not None:
            assert self.local_key is not None and self.remote_key is not None
            offer, answer = self._offer_answer(self.local_key, self.remote_key)
            try:
                saset = media_sas(self.role, offer, answer, call_id, 0, self.local_ip,
                                  self.local_port, self.remote[0], self.remote[1], self.keys)
                self.ipsec.install(saset.sas, saset.policies)
            except (ValueError, IPsecError) as exc:
                raise MediaError(f"media SAs: {exc}") from None
            self.call_id, self.saset = call_id, saset
            self.events.emit("fig2-media-sas", step="Fig2", call_id=call_id,
                             spi_out=self.saset.outbound.spi, spi_in=self.saset.inbound.spi,
                             local=f"{self.local_ip}:{self.local_port}",
                             remote=f"{self.remote[0]}:{self.remote[1]}")
        self.call_id = call_id
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
            sas = list(self.saset.sas)
            if self._rekey_new is not None:  # ended in the middle of a rekey
                sas += self._rekey_new.sas
            self.ipsec.remove(sas, policies)
            self.events.emit("fig2-media-sas-removed", call_id=self.call_id, why=why)
            self.saset = None
        self.receiver.close()  # RTP and RTCP sockets (also of a receiver never started)
        self._receiving = False

    def _offer_answer(self, mine: M2mKey, theirs: M2mKey) -> tuple[M2mKey, M2mKey]:
        return (mine, theirs) if self.role is Role.OFFERER else (theirs, mine)

    # -- Fig 3: moving the channel to other terminals -----------------------------------------
    def export(self) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """Step (1)/(3): the security information exchanged at call start and the keys in
        use, as they cross the network (inside the ESP-protected signalling). MediaError
        where there are none (open mode, or a channel not set up)."""
        if self.local_key is None or self.remote_key is None or not self.call_id:
            raise MediaError("this call has no media keys to reuse (open mode?): "
                             "use method renegotiate")
        offer, answer = self._offer_answer(self.local_key, self.remote_key)
        keys = self.keys or derive_media_keys(offer, answer, self.call_id, 0)
        security = {"offer": offer.serialize(), "answer": answer.serialize()}
        return security, {
            "offer-to-answer": {"enc": keys.offer_to_answer.enc_key.hex(),
                                "auth": keys.offer_to_answer.auth_key.hex()},
            "answer-to-offer": {"enc": keys.answer_to_offer.enc_key.hex(),
                                "auth": keys.answer_to_offer.auth_key.hex()},
        }

    def adopt(self, security: object, keys: object, remote: tuple[object, object],
              call_id: str) -> None:
        """Step (6) input: the old session's security information and keys, the new peer.
        Everything is checked (and the SAs built, not installed) before anything is taken:
        MediaError says what is unusable, and the session stays as it was."""
        offer, answer, given = reused_keys(security, keys)
        address = check_media_address(remote[0], "peer")
        port = check_media_port(remote[1], "peer")
        if self.ipsec is not None:
            try:  # the SAs these make: built now, installed by establish()
                media_sas(self.role, offer, answer, call_id, 0, self.local_ip,
                          self.local_port, address, port, given)
            except ValueError as exc:
                raise MediaError(f"media SAs: {exc}") from None
        self.local_key, self.remote_key = ((offer, answer) if self.role is Role.OFFERER
                                           else (answer, offer))
        self.keys = given
        self.remote = (address, port)

    # -- Fig 3 step (9): rekey without a media gap ----------------------------------------------
    def rekey_offer(self, spis_in_use: set[int]) -> M2mKey:
        """Initiator, first: our fresh key (nothing installed yet)."""
        self._rekey_local = M2mKey.fresh(spis_in_use | self.spis())
        self._rekey_phase = "offered"
        return self._rekey_local

    def _rekeying(self, phase: str, expected: str | None) -> tuple[NodeIpsec, MediaSaSet]:
        """What every rekey step needs; MediaError for a step that comes out of turn."""
        if self.ipsec is None or self.saset is None or self.remote is None:
            raise MediaError(f"rekey {phase}: no secure data channel to rekey")
        if self._rekey_phase != expected:
            raise MediaError(f"rekey {phase} out of turn (rekey state: "
                             f"{self._rekey_phase or 'idle'})")
        return self.ipsec, self.saset

    def _new_saset(self, mine: M2mKey, theirs: M2mKey) -> MediaSaSet:
        assert self.remote is not None
        if (theirs.ealg, theirs.alg) != (mine.ealg, mine.alg):
            raise MediaError(f"rekey: m2m-key uses {theirs.ealg}/{theirs.alg}, ours "
                             f"{mine.ealg}/{mine.alg}")
        offer, answer = self._offer_answer(mine, theirs)
        try:
            return media_sas(self.role, offer, answer, self.call_id, 0, self.local_ip,
                             self.local_port, self.remote[0], self.remote[1])
        except ValueError as exc:
            raise MediaError(f"rekey: {exc}") from None

    @staticmethod
    def _install_sas(ipsec: NodeIpsec, sas: list[SecurityAssociation]) -> None:
        try:
            ipsec.install(sas, [])
        except (ValueError, IPsecError) as exc:
            raise MediaError(f"rekey: {exc}") from None

    def rekey_answer(self, theirs: M2mKey, spis_in_use: set[int]) -> M2mKey:
        """Peer's side, first: our fresh key, and the new inbound SA before anything else."""
        ipsec, _ = self._rekeying("offer", None)
        mine = M2mKey.fresh(spis_in_use | self.spis())
        new = self._new_saset(mine, theirs)
        self._install_sas(ipsec, [new.inbound])
        self._rekey_local, self._rekey_new, self._rekey_phase = mine, new, "answered"
        return mine

    def rekey_commit(self, theirs: M2mKey) -> None:
        """Initiator, on the answer: new inbound and outbound SAs, outbound traffic moved to
        the new SA, the reused outbound SA deleted (lifetime 0 is explicit deletion)."""
        ipsec, saset = self._rekeying("answer", "offered")
        assert self._rekey_local is not None
        new = self._new_saset(self._rekey_local, theirs)
        self._install_sas(ipsec, [new.inbound, new.outbound])
        ipsec.update_policies(p for p in new.policies if p.spi is not None)
        ipsec.remove([saset.outbound], [])
        self._rekey_new, self._rekey_phase = new, "committed"

    def rekey_switch_outbound(self) -> None:
        """Peer, on commit: outbound moves to the new SA; both reused SAs are deleted."""
        ipsec, saset = self._rekeying("commit", "answered")
        new = self._rekey_new
        assert new is not None
        self._install_sas(ipsec, [new.outbound])
        ipsec.update_policies(p for p in new.policies if p.spi is not None)
        ipsec.remove([saset.outbound, saset.inbound], [])
        self._rekey_done(new)

    def rekey_finish(self) -> None:
        """Initiator, on done: the reused inbound SA goes too."""
        ipsec, saset = self._rekeying("done", "committed")
        new = self._rekey_new
        assert new is not None
        ipsec.remove([saset.inbound], [])
        self._rekey_done(new)

    def _rekey_done(self, new: MediaSaSet) -> None:
        self.saset, self._rekey_new, self._rekey_local, self._rekey_phase = new, None, None, None
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
        check_media_address(new_ip, "new local")
        if self.ipsec is None or self.saset is None:
            return
        assert self.remote is not None
        inbound = replace(self.saset.inbound, dst=new_ip, seq=0, replay_top=0, stats={},
                          selector=Selector(ANY, new_ip, IPPROTO_UDP))
        try:
            self.ipsec.install([inbound], self._in_policies(self.remote[0], new_ip))
        except (ValueError, IPsecError) as exc:
            raise MediaError(f"media SAs on {new_ip}: {exc}") from None
        self._leave(self.saset.inbound, self._in_policies(self.remote[0], self.local_ip))
        self.saset = replace(self.saset, inbound=inbound)

    def move_local(self, new_ip: str) -> None:
        """Moving side: outbound SA re-addressed with its sequence number kept, policies for
        the new source, then the sender — no packet is sent in between (same loop)."""
        assert self.remote is not None
        check_media_address(new_ip, "new local")
        old_ip = self.local_ip
        if self.ipsec is not None and self.saset is not None:
            out = self.saset.outbound
            moved = self._move_sa(out, new_ip, out.dst)
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
        check_media_address(new_ip, "peer's new")
        old_ip, port = self.remote
        if self.ipsec is not None and self.saset is not None:
            out = self.saset.outbound
            moved = self._move_sa(out, out.src, new_ip)
            self.ipsec.add_policies(self._in_policies(new_ip, self.local_ip))
            self.ipsec.add_policies(self._out_policies(self.local_ip, new_ip, moved.spi))
            self.saset = replace(self.saset, outbound=moved)
            self._leave(None, [*self._in_policies(old_ip, self.local_ip),
                               *self._out_policies(self.local_ip, old_ip, moved.spi)])
        self.remote = (new_ip, port)
        if self.sender is not None:
            self.sender.retarget(self.remote)
        self.events.emit("media-moved", session=self.call_id, side="remote", old=old_ip,
                         new=new_ip)

    def _move_sa(self, sa: SecurityAssociation, src: str, dst: str) -> SecurityAssociation:
        assert self.ipsec is not None
        try:
            return self.ipsec.move_sa(sa, src, dst, Selector(src, dst, IPPROTO_UDP))
        except (ValueError, IPsecError) as exc:
            raise MediaError(f"moving the media SA to {src}->{dst}: {exc}") from None

    def renegotiate(self, role: Role, mine: M2mKey, theirs: M2mKey,
                    local_ip: str | None = None, remote: tuple[str, int] | None = None) -> None:
        """Baseline B2 (classic SIP mobility): fresh keys and SPIs on the new address from a
        re-INVITE's offer/answer; then the old SAs go. The new SAs are built and installed
        before anything else changes: a MediaError leaves the session as it was."""
        assert self.remote is not None
        new_local = check_media_address(local_ip, "new local") if local_ip else self.local_ip
        new_remote = self.remote
        if remote is not None:
            new_remote = (check_media_address(remote[0], "peer"),
                          check_media_port(remote[1], "peer"))
        new_saset = None
        if self.ipsec is not None and (theirs.ealg, theirs.alg) != (mine.ealg, mine.alg):
            raise MediaError(f"m2m-key uses {theirs.ealg}/{theirs.alg}; ours "
                             f"{mine.ealg}/{mine.alg}")
        old_sas = list(self.saset.sas) if self.saset else []
        old_pols: list[Policy] = []
        if self.saset is not None:
            old_pols = [*self.saset.policies, *self._in_policies(self.remote[0], self.local_ip),
                        *self._out_policies(self.local_ip, self.remote[0],
                                            self.saset.outbound.spi)]
        if self.ipsec is not None:
            offer, answer = (mine, theirs) if role is Role.OFFERER else (theirs, mine)
            try:
                new_saset = media_sas(role, offer, answer, self.call_id, 0, new_local,
                                      self.local_port, new_remote[0], new_remote[1])
            except ValueError as exc:
                raise MediaError(f"media SAs: {exc}") from None
            in_use = {(p.selector, p.direction) for p in old_pols}
            if any((p.selector, p.direction) in in_use for p in new_saset.policies):
                raise MediaError("the new media addresses and ports are the ones in use: "
                                 "nothing to move")
            try:
                self.ipsec.install(new_saset.sas, new_saset.policies)
            except (ValueError, IPsecError) as exc:
                raise MediaError(f"media SAs: {exc}") from None
        self.role, self.local_key, self.remote_key, self.keys = role, mine, theirs, None
        self.local_ip, self.remote = new_local, new_remote
        if new_saset is not None:
            self.saset = new_saset
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
