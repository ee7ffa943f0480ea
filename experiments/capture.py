"""Captures for the analysis: one tshark pass per pcap (ESP decrypted with the run's esp_sa
file) into RTP and SIP rows, cached under <run>/analysis/ so a second analysis is quick.

Decrypted signalling carries key material (a=m2m-key nonces, the keys of a Fig 3 switch
request, Digest responses): it is redacted as rows are read, so neither the cache nor any
result holds it. Keys stay in the run's esp_sa file only."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nodes.ipsec.esp_sa import tshark_args

CACHE_VERSION = 2  # 2: key material redacted
# 16-byte values in base64 (m2m-key and Digest nonces) and 16/32-byte values in hex (media
# keys, Digest cnonce and response): nothing else in our SIP looks like either.
_SECRET_RE = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{22}==|\b(?:[0-9a-f]{64}|[0-9a-f]{32})\b")


def redact(text: str) -> str:
    return _SECRET_RE.sub("<redacted>", text)


@dataclass(frozen=True)
class Rtp:
    """One RTP packet (decrypted from ESP) as seen in a capture or logged by a receiver."""
    t_ns: int
    src: str
    sport: int
    dst: str
    dport: int
    ssrc: int
    seq: int


@dataclass(frozen=True)
class Sip:
    """One SIP message on the wire; `text` is everything after the start line (headers and
    body), as tshark's sip.msg_hdr holds it."""
    t_ns: int
    src: str
    sport: int
    dst: str
    dport: int
    size: int  # IP datagram bytes on the wire (ESP included)
    method: str | None
    status: int | None
    cseq: int | None
    cseq_method: str | None
    call_id: str | None
    text: str = ""

    @property
    def is_request(self) -> bool:
        return self.method is not None

    @property
    def body(self) -> str:
        return self.text.partition("\r\n\r\n")[2]

    @property
    def smig(self) -> dict[str, Any] | None:
        """The SMIG JSON body, if the message carries one."""
        body = self.body.strip()
        if not body.startswith("{"):
            return None
        try:
            value = json.loads(body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def smig_type(self) -> str | None:
        smig = self.smig
        kind = smig.get("type") if smig else None
        return str(kind) if kind is not None else None

    @property
    def label(self) -> str:
        """'MESSAGE switch-complete', '200 MESSAGE', 'REGISTER link-switch', ..."""
        head = self.method if self.is_request else f"{self.status} {self.cseq_method or ''}"
        kind = self.smig_type
        return f"{head.strip()} {kind}" if kind else head.strip()

    def transaction(self) -> tuple[str | None, int | None, str | None]:
        return (self.call_id, self.cseq, self.cseq_method)

    def retrans_key(self) -> tuple[Any, ...]:
        """Seen again with the same key = a retransmission (same Call-ID, CSeq, method or
        status, and hop)."""
        return (*self.transaction(), self.method or self.status, self.src, self.dst)

    def sessions(self) -> set[str]:
        smig = self.smig or {}
        found = {str(smig["session"])} if "session" in smig else set()
        return found | {str(s) for s in smig.get("sessions", []) if isinstance(s, str)}


@dataclass
class Capture:
    name: str
    rtp: list[Rtp] = field(default_factory=list)
    sip: list[Sip] = field(default_factory=list)


_FIELDS = ["frame.time_epoch", "ip.src", "ip.dst", "udp.srcport", "udp.dstport", "ip.len",
           "rtp.ssrc", "rtp.seq", "sip.Method", "sip.Status-Code", "sip.CSeq.seq",
           "sip.CSeq.method", "sip.Call-ID", "sip.msg_hdr"]
_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "\\": "\\", "a": "\a", "b": "\b", "f": "\f",
            "v": "\v", '"': '"'}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{3}|.)")


def tshark_unescape(text: str) -> str:
    """Undo tshark's escaping of control characters in -T fields output (\\r\\n, \\ooo)."""
    def one(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc.startswith("x") and len(esc) == 3:
            return chr(int(esc[1:], 16))
        if len(esc) == 3 and esc.isdigit():
            return chr(int(esc, 8))
        return _ESCAPES.get(esc, "\\" + esc)
    return _ESCAPE_RE.sub(one, text)


def epoch_ns(text: str) -> int:
    """'1796326247.758941000' -> exact integer nanoseconds (no float rounding)."""
    sec, _, frac = text.strip().partition(".")
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


def _int(text: str, base: int = 10) -> int | None:
    text = text.strip()
    if not text:
        return None
    return int(text, 16) if text.startswith("0x") else int(text, base)


def parse_tshark_row(row: list[str]) -> Rtp | Sip | None:
    """One -T fields row of `_FIELDS` -> Rtp or Sip (None for rows that are neither)."""
    row = row + [""] * (len(_FIELDS) - len(row))
    t, src, dst, sport, dport, iplen, ssrc, seq, method, status, cseq, cmeth, cid, hdr = row
    if not t or not src:
        return None
    if ssrc and seq:
        return Rtp(epoch_ns(t), src, _int(sport) or 0, dst, _int(dport) or 0,
                   _int(ssrc) or 0, _int(seq) or 0)
    if method or status:
        return Sip(epoch_ns(t), src, _int(sport) or 0, dst, _int(dport) or 0, _int(iplen) or 0,
                   method or None, _int(status), _int(cseq), cmeth or None, cid or None,
                   redact(tshark_unescape(hdr)))
    return None


def run_tshark(pcap: Path, esp: list[str], ports: Iterable[int]) -> Capture:
    """All RTP and SIP of one pcap, ESP decrypted. RTP inside ESP is found heuristically and on
    the run's known media ports."""
    cmd = ["tshark", "-n", "-r", str(pcap), *esp, "-o", "rtp.heuristic_rtp:TRUE"]
    for port in sorted(set(ports)):
        cmd += ["-d", f"udp.port=={port},rtp"]
    cmd += ["-Y", "(rtp || sip) && !icmp", "-T", "fields", "-E", "separator=\t",
            "-E", "occurrence=f"]
    for name in _FIELDS:
        cmd += ["-e", name]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    # A capture cut short by the end of the run ends in a partial packet: tshark says so and
    # exits 1 after printing the good rows.
    if out.returncode != 0 and not out.stdout and "cut short" not in out.stderr:
        raise RuntimeError(f"tshark failed on {pcap.name}: {out.stderr.strip()[-500:]}")
    cap = Capture(pcap.stem)
    for line in out.stdout.splitlines():
        item = parse_tshark_row(line.split("\t"))
        if isinstance(item, Rtp):
            cap.rtp.append(item)
        elif isinstance(item, Sip):
            cap.sip.append(item)
    return cap


def load_capture(pcap: Path, esp_sa: Path, ports: Sequence[int], cache_dir: Path) -> Capture:
    """`run_tshark`, cached in `cache_dir` until the pcap, the esp_sa file or the ports change."""
    st, es = pcap.stat(), esp_sa.stat() if esp_sa.exists() else None
    key = [CACHE_VERSION, st.st_size, st.st_mtime_ns, es.st_size if es else 0,
           es.st_mtime_ns if es else 0, sorted(set(ports))]
    cache = cache_dir / f"{pcap.stem}.json"
    if cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return Capture(pcap.stem, [Rtp(*r) for r in data["rtp"]],
                               [Sip(*s) for s in data["sip"]])
        except (ValueError, TypeError, KeyError):
            pass  # a stale or broken cache is rebuilt
    esp = tshark_args(esp_sa) if es else []
    cap = run_tshark(pcap, esp, ports)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "rtp": [list(asdict(r).values()) for r in cap.rtp],
                               "sip": [list(asdict(s).values()) for s in cap.sip]}))
    tmp.replace(cache)
    return cap
