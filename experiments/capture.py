"""Captures for the analysis: one tshark pass per pcap (ESP decrypted with the run's esp_sa
file) into RTP and SIP rows, cached under <run>/analysis/ so a second analysis is quick.

Decrypted signalling carries key material (a=m2m-key nonces, the keys of a Fig 3 switch
request, Digest responses): it is redacted as rows are read, so neither the cache nor any
result holds it. Keys stay in the run's esp_sa file only."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CACHE_VERSION = 3  # 2: key material redacted; 3: problems kept, failed tshark runs never cached
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
    problems: list[str] = field(default_factory=list)  # e.g. the pcap is cut short


class CaptureError(RuntimeError):
    """A capture (or the esp_sa file it needs) that could not be read; the message names the
    file and what is wrong."""


_HEX_RE = re.compile(r"0x[0-9a-fA-F]+")
_ESP_SA_COLUMNS = ("protocol", "source", "destination", "SPI", "encryption",
                   "encryption key", "authentication", "authentication key")


def esp_sa_row_problem(row: str) -> str | None:
    """Why one esp_sa row is not a row tshark can use (None: it is one)."""
    try:
        fields = next(csv.reader([row]))
    except (csv.Error, StopIteration) as exc:
        return f"not a CSV row ({exc})"
    if len(fields) != len(_ESP_SA_COLUMNS):
        return f"{len(fields)} fields, not {len(_ESP_SA_COLUMNS)} (a torn or edited line?)"
    proto, _, _, spi, _, enc_key, _, auth_key = fields
    if proto not in ("IPv4", "IPv6", "Any"):
        return f"protocol {proto!r} is none of IPv4, IPv6, Any"
    if spi != "*" and not _HEX_RE.fullmatch(spi):
        return f"SPI {spi!r} is not 0x<hex>"
    for name, key in (("encryption key", enc_key), ("authentication key", auth_key)):
        if key and (not _HEX_RE.fullmatch(key) or len(key) % 2):
            return f"{name} is not 0x<hex> of whole bytes"
    return None


def esp_sa_options(path: Path) -> tuple[list[str], list[str]]:
    """tshark options decrypting ESP with every good row of the run's esp_sa file (each row
    once), and a problem per row that is not usable (named by file and line: tshark would
    refuse the whole command for one bad row). Raises CaptureError if the file cannot be
    read at all."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CaptureError(f"{path.name}: cannot be read ({exc.strerror or exc}): SIP and RTP "
                           "inside ESP not decrypted") from exc
    args = ["-o", "esp.enable_encryption_decode:TRUE",
            "-o", "esp.enable_authentication_check:TRUE"]
    problems: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(raw.split(b"\n"), 1):
        try:
            row = line.decode().strip()
        except UnicodeDecodeError:
            problems.append(f"{path.name} line {n}: not UTF-8 text: its SA is not decrypted")
            continue
        if not row or row.startswith("#") or row in seen:
            continue
        why = esp_sa_row_problem(row)
        if why:
            problems.append(f"{path.name} line {n}: {why}: its SA is not decrypted")
            continue
        seen.add(row)
        args += ["-o", f"uat:esp_sa:{row}"]
    if not seen:
        problems.append(f"{path.name} has no usable rows: SIP and RTP inside ESP not decrypted")
    return args, problems


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
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                             timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CaptureError(f"pcaps/{pcap.name}: tshark did not run: {exc}") from exc
    cap = Capture(pcap.stem)
    if out.returncode != 0:
        # A capture cut short ends in a partial packet: tshark says so and exits non-zero
        # after printing the good rows; they are kept, and the shortfall is a problem.
        # Any other failure is an error (partial output of a failed run is never used).
        if "cut short" not in out.stderr:
            raise CaptureError(f"pcaps/{pcap.name}: tshark failed (exit {out.returncode}): "
                               f"{_tshark_error(out.stderr)}")
        cap.problems.append(f"pcaps/{pcap.name} is cut short (ends in a partial packet): "
                            "what it held after that is lost")
    for line in out.stdout.splitlines():
        item = parse_tshark_row(line.split("\t"))
        if isinstance(item, Rtp):
            cap.rtp.append(item)
        elif isinstance(item, Sip):
            cap.sip.append(item)
    return cap


def _tshark_error(stderr: str) -> str:
    """tshark's own complaint, without its 'Running as user root' banner."""
    lines = [ln for ln in stderr.strip().splitlines()
             if ln.strip() and not ln.startswith("Running as user")]
    text = " ".join(lines)
    if "uat:esp_sa:" in text:  # a row tshark refused: never print its keys
        text = re.sub(r"uat:esp_sa:[^\"]*", "uat:esp_sa:<row>", text)
        text = "tshark refused a row of esp_sa: " + text
    return redact(text)[-500:] or "no message"


def _cached(cache: Path, key: list[Any], name: str) -> Capture | None:
    try:
        data = json.loads(cache.read_text())
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        return Capture(name, [Rtp(*r) for r in data["rtp"]], [Sip(*s) for s in data["sip"]],
                       [str(p) for p in data.get("problems", [])])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # a stale or broken cache is rebuilt


def load_capture(pcap: Path, esp_sa: Path, ports: Sequence[int], cache_dir: Path,
                 esp: list[str] | None = None) -> Capture:
    """`run_tshark` (with `esp`, the esp_sa file's options: `esp_sa_options(esp_sa)` when not
    given), cached in `cache_dir` until the pcap, the esp_sa file or the ports change; a
    failed run (CaptureError) is never cached."""
    try:
        st = pcap.stat()
        es = esp_sa.stat() if esp_sa.is_file() else None
    except OSError as exc:
        raise CaptureError(f"pcaps/{pcap.name}: cannot be read ({exc.strerror or exc})") from exc
    if not pcap.is_file():
        raise CaptureError(f"pcaps/{pcap.name} is not a file")
    key = [CACHE_VERSION, st.st_size, st.st_mtime_ns, es.st_size if es else 0,
           es.st_mtime_ns if es else 0, sorted(set(ports))]
    cache = cache_dir / f"{pcap.stem}.json"
    cap = _cached(cache, key, pcap.stem) if cache.is_file() else None
    if cap is not None:
        return cap
    if esp is None:
        esp = esp_sa_options(esp_sa)[0] if es else []
    cap = run_tshark(pcap, esp, ports)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key,
                                   "rtp": [list(asdict(r).values()) for r in cap.rtp],
                                   "sip": [list(asdict(s).values()) for s in cap.sip],
                                   "problems": cap.problems}))
        tmp.replace(cache)
    except OSError:
        pass  # no cache: the next analysis runs tshark again
    return cap
