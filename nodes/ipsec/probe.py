"""Kernel capability probe for IPsec: can this kernel hold an ESP SA? Picks the backend.

`kernel_has_esp()` creates a scratch network namespace, asks XFRM (over NETLINK_XFRM, with
`xfrm.XfrmSocket`) to add a transport-mode ESP SA with the lab's algorithms, and removes the
namespace (and with it the SA) whatever happens. Needs root; without it the answer is False.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess

from pyroute2.netlink.exceptions import NetlinkError

from nodes.ipsec import xfrm as X

log = logging.getLogger("smig.ipsec.probe")

ENV_OVERRIDE = "SMIG_IPSEC_BACKEND"
BACKENDS = ("kernel", "userspace")


def _probe_sa() -> X.xfrm_usersa_info:
    msg = X.xfrm_usersa_info()
    msg["sel"] = {"family": socket.AF_INET}
    msg["id"] = {"daddr": "192.0.2.2", "spi": 0x100, "proto": socket.IPPROTO_ESP}
    msg["saddr"] = "192.0.2.1"  # TEST-NET-1: never routed; the SA lives only in the scratch ns
    msg["lft"] = dict.fromkeys(
        ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit"),
        X.XFRM_INF,
    )
    msg["family"] = socket.AF_INET
    msg["mode"] = X.XFRM_MODE_TRANSPORT
    msg["replay_window"] = 32
    msg["attrs"] = [
        ["XFRMA_ALG_CRYPT", {"alg_name": "cbc(aes)", "alg_key_len": 128,
                             "alg_key": X.SecretBytes(bytes(16))}],
        ["XFRMA_ALG_AUTH_TRUNC", {"alg_name": "hmac(sha256)", "alg_key_len": 256,
                                  "alg_trunc_len": 128, "alg_key": X.SecretBytes(bytes(32))}],
    ]  # fmt: skip
    return msg


def kernel_has_esp() -> bool:
    """True if the kernel accepts an AES-CBC/HMAC-SHA-256-128 transport ESP SA."""
    if os.geteuid() != 0:
        log.info("ESP probe: not root, assuming no kernel ESP")
        return False
    name = f"smig-esp-probe-{secrets.token_hex(3)}"
    # `ip netns add`, not pyroute2's netns.create: that forks a copy of this interpreter,
    # which must never run the caller's code (a lab's teardown, say) on its way out.
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        log.info("ESP probe: cannot create a scratch namespace: %s", made.stderr.strip())
        return False
    try:
        with X.XfrmSocket(netns=name) as sock:
            sock.sa_add(_probe_sa())
            sock.sa_delete("192.0.2.2", 0x100)
        return True
    except (NetlinkError, OSError) as exc:
        log.info("ESP probe: kernel ESP unavailable: %s", exc)
        return False
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def select_backend(override: str | None = None) -> str:
    """ "kernel" or "userspace": `override`, else $SMIG_IPSEC_BACKEND, else the probe's
    answer. An override naming neither backend is a ValueError."""
    choice = override or os.environ.get(ENV_OVERRIDE) or None
    if choice is not None:
        choice = choice.strip().lower()
        if choice not in BACKENDS:
            raise ValueError(f"unknown IPsec backend {choice!r} (expected one of {BACKENDS})")
        return choice
    return "kernel" if kernel_has_esp() else "userspace"
