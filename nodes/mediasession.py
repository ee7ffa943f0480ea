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
from pathlib import Path
from typing import Any

from nodes.events import EventLog
from nodes.ipsec.node import NodeIpsec
from nodes.media import Receiver, VideoSender, VoiceSender
from nodes.mediakeys import M2mKey, MediaSaSet, Role, media_key, media_sas, set_media_key
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
                 spis_in_use: set[int] | None = None) -> None:
        if kind not in FORMATS:
            raise MediaError(f"unknown media kind {kind!r} (expected audio or video)")
        self.role, self.local_ip, self.kind = role, local_ip, kind
        self.events, self.ipsec, self.loop = events, ipsec, loop
        self.call_id = ""
        self.receiver = Receiver(0, log=events, wav=wav if kind == "audio" else None,
                                 name=f"rx-{kind}")
        self.local_port = self.receiver.port
        self.local_key = M2mKey.fresh(spis_in_use or set()) if ipsec is not None else None
        self.remote_key: M2mKey | None = None
        self.remote: tuple[str, int] | None = None
        self.saset: MediaSaSet | None = None
        self.sender: VoiceSender | VideoSender | None = None
        self._receiving = False

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
            offer, answer = ((self.local_key, self.remote_key) if self.role is Role.OFFERER
                             else (self.remote_key, self.local_key))
            self.saset = media_sas(self.role, offer, answer, call_id, 0, self.local_ip,
                                   self.local_port, self.remote[0], self.remote[1])
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
        """Stop sending, stop receiving, remove the media SAs (BYE, or the node exits)."""
        if self.sender is not None:
            await self.sender.stop()
        if self._receiving:
            self.receiver.close()
            self._receiving = False
        else:
            self.receiver.rtp_socket.close()
        if self.saset is not None and self.ipsec is not None:
            self.ipsec.remove(self.saset.sas, self.saset.policies)
            self.events.emit("fig2-media-sas-removed", call_id=self.call_id, why=why)
            self.saset = None

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
