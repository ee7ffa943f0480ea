"""Writer for Wireshark's `esp_sa` UAT file, so tshark can decrypt a run's ESP captures.

Opt-in: only a backend given a path writes keys, into the run folder. One row per installed
SA, in tshark 4.0's column order (protocol, source, destination, SPI, encryption, encryption
key, authentication, authentication key), e.g.

    "IPv4","10.0.1.10","10.0.3.10","0x00001001","AES-CBC [RFC3602]","0x<key>",
    "HMAC-SHA-256-128 [RFC4868]","0x<key>"          (one line in the file)

Each row is one `write()` on an O_APPEND descriptor, so several node processes can append to
the same file without interleaving. `tshark_args()` turns the file into tshark options.
"""

from __future__ import annotations

import os
from pathlib import Path

from nodes.ipsec.api import SecurityAssociation

ENC_NAMES = {"aes-cbc": "AES-CBC [RFC3602]", "null": "NULL"}
AUTH_NAMES = {
    "hmac-sha-256-128": "HMAC-SHA-256-128 [RFC4868]",
    "hmac-sha-1-96": "HMAC-SHA-1-96 [RFC2404]",
}


def esp_sa_row(sa: SecurityAssociation) -> str:
    """One UAT row (without newline) describing `sa`."""
    enc_key = "0x" + sa.enc_key.hex() if sa.enc_key else ""
    fields = [
        "IPv4",
        sa.src,
        sa.dst,
        f"0x{sa.spi:08x}",
        ENC_NAMES[sa.enc_alg],
        enc_key,
        AUTH_NAMES[sa.auth_alg],
        "0x" + sa.auth_key.hex(),
    ]
    return ",".join(f'"{f}"' for f in fields)


class EspSaFile:
    """Appends one row per SA to a Wireshark `esp_sa` file (created if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def add(self, sa: SecurityAssociation) -> None:
        line = (esp_sa_row(sa) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"EspSaFile({str(self.path)!r})"


def tshark_args(path: str | os.PathLike[str]) -> list[str]:
    """tshark options that enable ESP decryption with every row of the file (duplicates,
    e.g. an SA written by both of its ends, are passed once)."""
    args = ["-o", "esp.enable_encryption_decode:TRUE"]
    args += ["-o", "esp.enable_authentication_check:TRUE"]
    seen: set[str] = set()
    for line in Path(path).read_text().splitlines():
        row = line.strip()
        if row and not row.startswith("#") and row not in seen:
            seen.add(row)
            args += ["-o", f"uat:esp_sa:{row}"]
    return args
