"""nftables for the userspace ESP engine: one script (an atomic `nft -f` batch) at a time.

Every SPD change rewrites the engine's rules, and that sits on the handover path: an `nft`
process costs 15–20 ms here, libnftables in this process under 1 ms. So scripts go through
libnftables (Debian's python3-nftables, a ctypes binding that releases the GIL) when it is
importable, else through `nft -f -`. A libnftables context keeps the netlink socket it opened
when it was made, so it is made inside the engine's namespace and then used from anywhere.

    nft = Nft(netns="h1")          # or None: this process's namespace
    nft.run("add table ip t\\n")   # IPsecError with nft's own message on failure
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
from typing import Any

from nodes.ipsec.api import IPsecError
from nodes.ipsec.netns import in_netns, netns_path

log = logging.getLogger("ipsec.nft")


def _libnftables(netns: str | None) -> Any | None:
    try:
        import nftables  # Debian's python3-nftables (system site packages)
    except ImportError:
        return None
    try:
        return in_netns(netns, nftables.Nftables)
    except OSError as exc:  # no libnftables.so.1, or the namespace is gone
        log.info("libnftables unavailable (%s): nft runs as a process", exc)
        return None


class Nft:
    def __init__(self, netns: str | None = None, in_process: bool = True) -> None:
        self.netns = netns
        self._lib = _libnftables(netns) if in_process else None
        self._lock = threading.Lock()  # one context, one batch at a time

    @property
    def mode(self) -> str:
        return "libnftables" if self._lib is not None else "nft process"

    def run(self, script: str) -> str:
        """Run `script` as one batch; its output (listings) or IPsecError."""
        if self._lib is not None:
            with self._lock:
                rc, out, err = self._lib.cmd(script)
            if rc != 0:
                raise IPsecError(f"nft failed: {_first_error(err)}")
            return str(out)
        argv = ["nft", "-f", "-"]
        path = netns_path(self.netns)
        if path is not None:
            argv = ["nsenter", f"--net={path}", *argv]
        done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=20,
                              check=False)
        if done.returncode != 0:
            raise IPsecError(f"nft failed: {_first_error(done.stderr)}")
        return done.stdout

    def counter_packets(self, table: str, counter: str) -> int:
        """Packets of a named counter (0 if the table or counter is gone)."""
        try:
            out = self.run(f"list counter ip {table} {counter}\n")
        except IPsecError:
            return 0
        found = re.search(r"\bpackets (\d+)", out)
        return int(found.group(1)) if found else 0


def _first_error(text: str) -> str:
    """nft's messages end with the offending line and a caret: keep the message lines."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error:" in ln]
    return "; ".join(errors or lines[:1]) or "no message"
