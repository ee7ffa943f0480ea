"""The esp_sa writer: row format, concurrent appends, and tshark 4.0 decrypting and
verifying our ESP packets (all four algorithm pairs) with the rows it wrote."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from nodes.ipsec import esp
from nodes.ipsec.api import SecurityAssociation
from nodes.ipsec.esp_sa import EspSaFile, esp_sa_row, tshark_args

ALGS = [
    ("aes-cbc", "hmac-sha-256-128"),
    ("null", "hmac-sha-1-96"),
    ("aes-cbc", "hmac-sha-1-96"),
    ("null", "hmac-sha-256-128"),
]


def random_sa(spi: int, enc: str, auth: str) -> SecurityAssociation:
    return SecurityAssociation(
        "10.99.1.1", "10.99.1.2", spi, enc, os.urandom(16) if enc == "aes-cbc" else b"",
        auth, os.urandom(32 if auth == "hmac-sha-256-128" else 20),
    )


def test_row_format() -> None:
    sa = SecurityAssociation("10.0.1.10", "10.0.3.10", 0x1001, "aes-cbc", b"\x11" * 16,
                             "hmac-sha-256-128", b"\x22" * 32)
    assert esp_sa_row(sa) == (
        '"IPv4","10.0.1.10","10.0.3.10","0x00001001","AES-CBC [RFC3602]","0x' + "11" * 16
        + '","HMAC-SHA-256-128 [RFC4868]","0x' + "22" * 32 + '"'
    )


def _append_many(path: str, base: int) -> None:
    f = EspSaFile(path)
    for i in range(200):
        f.add(random_sa(base + i, "aes-cbc", "hmac-sha-256-128"))


def test_concurrent_appends_keep_rows_whole(tmp_path: Path) -> None:
    path = str(tmp_path / "esp_sa")
    procs = [multiprocessing.Process(target=_append_many, args=(path, 0x1000 * (n + 1)))
             for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 800
    assert all(line.count('","') == 7 and line.endswith('"') for line in lines)
    assert os.stat(path).st_mode & 0o077 == 0  # keys: owner only


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_decrypts_and_verifies_our_esp(tmp_path: Path) -> None:
    table = EspSaFile(tmp_path / "esp_sa")
    frames = []
    for i, (enc, auth) in enumerate(ALGS):
        sa = random_sa(0x2001 + i, enc, auth)
        table.add(sa)
        table.add(sa)  # both ends of an SA write it: duplicates must not matter
        wire = esp.SaState(sa).send(bytes(UDP(sport=5062, dport=5064) / f"secret {i}".encode()),
                                    17)
        frames.append(Ether() / IP(src=sa.src, dst=sa.dst, proto=50) / wire)
    wrpcap(str(tmp_path / "esp.pcap"), frames)
    out = subprocess.run(
        ["tshark", "-r", str(tmp_path / "esp.pcap"), *tshark_args(table.path),
         "-T", "fields", "-e", "esp.spi", "-e", "udp.payload", "-e", "esp.icv_good"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert rows == [
        [f"0x{0x2001 + i:08x}", f"secret {i}".encode().hex(), "1"] for i in range(len(ALGS))
    ]
