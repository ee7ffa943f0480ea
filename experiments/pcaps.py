"""Reading captures with tshark field extraction (fast, and the same dissectors a user sees)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def tshark_fields(
    pcap: Path, display_filter: str, fields: list[str], extra: list[str] | None = None
) -> list[list[str]]:
    """Rows of `fields` for the packets matching `display_filter`.

    A capture still being written may end in a partial packet; tshark says so and exits 1,
    but the rows before it are good, so only a run that printed nothing at all is an error.
    """
    cmd = ["tshark", "-n", "-r", str(pcap), "-Y", display_filter, "-T", "fields",
           "-E", "separator=\t", *(extra or [])]
    for field in fields:
        cmd += ["-e", field]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0 and not out.stdout and "cut short" not in out.stderr:
        raise RuntimeError(f"tshark failed on {pcap.name}: {out.stderr.strip()}")
    return [line.split("\t") for line in out.stdout.splitlines() if line]


def packet_times(pcap: Path, display_filter: str) -> list[float]:
    """Capture timestamps (epoch seconds, the wall clock) of the matching packets."""
    return [float(row[0]) for row in tshark_fields(pcap, display_filter, ["frame.time_epoch"])]


def sip_messages(pcap: Path, extra: list[str] | None = None,
                 display_filter: str = "sip") -> list[dict[str, object]]:
    """Every SIP message in a capture, in capture order: time, addresses, method or status,
    Call-ID and the body (decrypted first when `extra` holds the run's esp_sa options)."""
    import json

    fields = ["frame.time_epoch", "ip.src", "ip.dst", "udp.srcport", "udp.dstport",
              "sip.Method", "sip.Status-Code", "sip.CSeq.method", "sip.msg_hdr", "esp.spi"]
    cmd = ["tshark", "-n", "-r", str(pcap), *(extra or []), "-Y", display_filter, "-T", "json"]
    for field in fields:
        cmd += ["-e", field]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0 and not out.stdout:
        raise RuntimeError(f"tshark failed on {pcap.name}: {out.stderr.strip()}")
    messages: list[dict[str, object]] = []
    for pkt in json.loads(out.stdout or "[]"):
        f = pkt["_source"]["layers"]

        def one(name: str, f: dict = f) -> str | None:
            v = f.get(name)
            return v[0] if v else None

        hdr = one("sip.msg_hdr") or ""
        _, _, body = hdr.partition("\r\n\r\n")
        messages.append({
            "t": float(one("frame.time_epoch") or 0), "src": one("ip.src"),
            "dst": one("ip.dst"), "sport": one("udp.srcport"), "dport": one("udp.dstport"),
            "method": one("sip.Method"), "status": one("sip.Status-Code"),
            "cseq_method": one("sip.CSeq.method"), "body": body, "esp": bool(f.get("esp.spi")),
        })
    return messages


_TCPDUMP_STATS = re.compile(r"^(\d+) packets? (captured|received by filter|dropped by kernel)$",
                            re.MULTILINE)


def capture_shortfall(tcpdump_log: str) -> str | None:
    """What a stopped tcpdump says it did not write (its closing statistics), or None when it
    wrote every packet it received. A capture without statistics was killed: say so."""
    stats = {kind: int(n) for n, kind in _TCPDUMP_STATS.findall(tcpdump_log)}
    if "captured" not in stats:
        return "no closing statistics (tcpdump was killed)"
    missing = stats.get("received by filter", 0) - stats["captured"]
    dropped = stats.get("dropped by kernel", 0)
    if missing <= 0 and dropped == 0:
        return None
    return (f"{stats['captured']} of {stats.get('received by filter', 0)} packets written, "
            f"{dropped} dropped by the kernel"
            + (" (tcpdump fell behind: the machine was busy)" if dropped else ""))
