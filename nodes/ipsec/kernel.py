"""Kernel IPsec backend: the Linux XFRM SAD/SPD of one network namespace, over NETLINK_XFRM.

Use (as root; `netns` is a name under /run/netns, None = this process's namespace)::

    with KernelBackend(netns="a1", on_expire=callback) as backend:
        backend.add_sa(sa); backend.add_policy(policy)
        backend.move_sa(sa.dst, sa.spi, new_src, new_dst, new_selector)

Every SA and policy this instance installs is remembered and removed by `flush()`/`close()`;
nothing else in the namespace is touched. Transport-mode ESP only (DESIGN §2). An SA's `seq`
is the last sequence number sent (the kernel's `oseq`), `replay_top` the highest received.
Not thread-safe across threads: call it from one thread (the expiry listener has its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from nodes.ipsec import xfrm as X
from nodes.ipsec.api import (
    AUTH_ALGS,
    ENC_ALGS,
    IPPROTO_ESP,
    Direction,
    IPsecBackend,
    IPsecError,
    Policy,
    SecurityAssociation,
    Selector,
)
from nodes.ipsec.netns import in_netns

log = logging.getLogger("smig.ipsec.kernel")

_XFRM_TO_ENC = {v: k for k, v in ENC_ALGS.items()}
_XFRM_TO_AUTH = {(v[0], v[1] * 8): k for k, v in AUTH_ALGS.items()}
_DIRS = {Direction.IN: X.XFRM_POLICY_IN, Direction.OUT: X.XFRM_POLICY_OUT}
_NO_LIMITS = dict.fromkeys(
    ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit"), X.XFRM_INF
)
MAX_REPLAY_WINDOW = 32  # xfrm_usersa_info.replay_window with the legacy 32-bit bitmap
# /proc/net/xfrm_stat counters behind the API's namespace-wide counters
_STAT_COUNTERS = {
    "integrity_failed": ("XfrmInStateProtoError",),
    "replay_dropped": ("XfrmInStateSeqError",),
    "no_sa": ("XfrmInNoStates", "XfrmOutNoStates"),
    "policy_dropped": (
        "XfrmInNoPols",
        "XfrmInPolBlock",
        "XfrmInTmplMismatch",
        "XfrmOutPolBlock",
        "XfrmOutPolError",
    ),
}


@dataclass(frozen=True)
class SaExpired:
    """An XFRM_MSG_EXPIRE notification: soft (time to rekey) or hard (the kernel deleted it)."""

    src: str
    dst: str
    spi: int
    hard: bool


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


def _check_sa(sa: SecurityAssociation) -> int:
    """Validate what the kernel message needs beyond the API's checks; return the family."""
    family = X.family_of(sa.src)
    if X.family_of(sa.dst) != family:
        raise ValueError(f"SA {sa.src}->{sa.dst}: mixed address families")
    if not 0 <= sa.replay_window <= MAX_REPLAY_WINDOW:
        raise ValueError(f"replay window {sa.replay_window} out of range 0..{MAX_REPLAY_WINDOW}")
    if sa.lifetime_seconds is not None and sa.lifetime_seconds < 0:
        raise ValueError(f"negative lifetime {sa.lifetime_seconds}")
    if not 0 <= sa.seq < 2**32 or not 0 <= sa.replay_top < 2**32:
        raise ValueError("seq/replay_top out of the 32-bit sequence space")
    if sa.selector is not None:
        _selector(sa.selector)
    return family


def _selector(sel: Selector) -> dict[str, Any]:
    family = X.family_of(sel.src)
    if X.family_of(sel.dst) != family:
        raise ValueError(f"selector {sel}: mixed address families")
    if not 0 <= sel.proto <= 255 or not 0 <= sel.sport <= 65535 or not 0 <= sel.dport <= 65535:
        raise ValueError(f"selector {sel}: protocol or port out of range")
    full = 32 if family == socket.AF_INET else 128
    return {
        "daddr": sel.dst,
        "saddr": sel.src,
        "family": family,
        "prefixlen_d": 0 if sel.dst in ("0.0.0.0", "::") else full,
        "prefixlen_s": 0 if sel.src in ("0.0.0.0", "::") else full,
        "proto": sel.proto,
        "dport": sel.dport,
        "dport_mask": 0xFFFF if sel.dport else 0,
        "sport": sel.sport,
        "sport_mask": 0xFFFF if sel.sport else 0,
    }


def _selector_from(sel: dict[str, Any]) -> Selector:
    family = sel["family"]
    return Selector(
        src=X.unpack_addr(sel["saddr"], family),
        dst=X.unpack_addr(sel["daddr"], family),
        proto=sel["proto"],
        sport=sel["sport"] if sel["sport_mask"] else 0,
        dport=sel["dport"] if sel["dport_mask"] else 0,
    )


def sa_message(sa: SecurityAssociation) -> X.xfrm_usersa_info:
    """The NEWSA/UPDSA message for `sa` (its seq/replay_top, if set, carried over)."""
    family = _check_sa(sa)
    enc_name = ENC_ALGS[sa.enc_alg]
    auth_name, icv_len = AUTH_ALGS[sa.auth_alg]
    msg = X.xfrm_usersa_info()
    msg["sel"] = _selector(sa.selector) if sa.selector else {"family": family}
    msg["id"] = {"daddr": sa.dst, "spi": sa.spi, "proto": IPPROTO_ESP}
    msg["saddr"] = sa.src
    hard = sa.lifetime_seconds or 0  # XFRM: 0 = never expires
    soft = hard - max(1, hard // 10) if hard > 1 else 0  # a soft expiry before the hard one
    msg["lft"] = {**_NO_LIMITS, "hard_add_expires_seconds": hard, "soft_add_expires_seconds": soft}
    msg["family"] = family
    msg["mode"] = X.XFRM_MODE_TRANSPORT
    msg["replay_window"] = sa.replay_window
    attrs: list[list[Any]] = [
        [
            "XFRMA_ALG_CRYPT",
            {
                "alg_name": enc_name,
                "alg_key_len": len(sa.enc_key) * 8,
                "alg_key": X.SecretBytes(sa.enc_key),
            },
        ],
        [
            "XFRMA_ALG_AUTH_TRUNC",
            {
                "alg_name": auth_name,
                "alg_key_len": len(sa.auth_key) * 8,
                "alg_trunc_len": icv_len * 8,
                "alg_key": X.SecretBytes(sa.auth_key),
            },
        ],
    ]
    if sa.seq or sa.replay_top:
        # Everything at or below replay_top counts as already received (as in esp.SaState).
        bitmap = (1 << sa.replay_window) - 1 if sa.replay_top else 0
        attrs.append(["XFRMA_REPLAY_VAL", {"oseq": sa.seq, "seq": sa.replay_top, "bitmap": bitmap}])
    msg["attrs"] = attrs
    return msg


def sa_from_message(msg: Any) -> SecurityAssociation | None:
    """The API view of a kernel SA; None if it is not one the API can describe."""
    if msg["id"]["proto"] != IPPROTO_ESP or msg["mode"] != X.XFRM_MODE_TRANSPORT:
        return None
    crypt, auth = msg.get_attr("XFRMA_ALG_CRYPT"), msg.get_attr("XFRMA_ALG_AUTH_TRUNC")
    if crypt is None or auth is None:
        return None
    enc_alg = _XFRM_TO_ENC.get(_text(crypt["alg_name"]))
    auth_alg = _XFRM_TO_AUTH.get((_text(auth["alg_name"]), auth["alg_trunc_len"]))
    if enc_alg is None or auth_alg is None:
        return None
    family = msg["family"]
    sel = msg["sel"]
    replay = msg.get_attr("XFRMA_REPLAY_VAL") or {"oseq": 0, "seq": 0}
    stats, cur = msg["stats"], msg["curlft"]
    # An SA carries one direction: the kernel advances oseq only when it sends on it.
    outbound = replay["oseq"] > 0
    hard = msg["lft"]["hard_add_expires_seconds"]
    return SecurityAssociation(
        src=X.unpack_addr(msg["saddr"], family),
        dst=X.unpack_addr(msg["id"]["daddr"], family),
        spi=msg["id"]["spi"],
        enc_alg=enc_alg,
        enc_key=X.SecretBytes(crypt["alg_key"]),
        auth_alg=auth_alg,
        auth_key=X.SecretBytes(auth["alg_key"]),
        selector=_selector_from(sel) if sel["prefixlen_d"] or sel["prefixlen_s"] else None,
        replay_window=msg["replay_window"],
        lifetime_seconds=hard or None,
        seq=replay["oseq"],
        replay_top=replay["seq"],
        stats={
            "packets_in": 0 if outbound else cur["packets"],
            "packets_out": cur["packets"] if outbound else 0,
            "bytes": cur["bytes"],
            "integrity_failed": stats["integrity_failed"],
            "replay_dropped": stats["replay"] + stats["replay_window"],
        },
    )


def policy_message(policy: Policy) -> X.xfrm_userpolicy_info:
    if policy.spi is not None and not 0 < policy.spi < 2**32:
        raise ValueError(f"template SPI {policy.spi} out of range")
    if not 0 <= policy.priority < 2**32:
        raise ValueError(f"policy priority {policy.priority} out of range")
    sel = _selector(policy.selector)
    family = X.family_of(policy.tmpl_src)
    if X.family_of(policy.tmpl_dst) != family:
        raise ValueError("template addresses of mixed families")
    msg = X.xfrm_userpolicy_info()
    msg["sel"] = sel
    msg["lft"] = _NO_LIMITS
    msg["priority"] = policy.priority
    msg["dir"] = _DIRS[policy.direction]
    msg["action"] = X.XFRM_POLICY_ALLOW
    tmpl = {
        "id": {"daddr": policy.tmpl_dst, "spi": policy.spi or 0, "proto": IPPROTO_ESP},
        "family": family,
        "saddr": policy.tmpl_src,
        "mode": X.XFRM_MODE_TRANSPORT,
        "aalgos": 0xFFFFFFFF,
        "ealgos": 0xFFFFFFFF,
        "calgos": 0xFFFFFFFF,
    }
    msg["attrs"] = [["XFRMA_TMPL", [tmpl]]]
    return msg


def policy_from_message(msg: Any) -> Policy | None:
    direction = {v: k for k, v in _DIRS.items()}.get(msg["dir"])
    tmpls = msg.get_attr("XFRMA_TMPL") or []
    if direction is None or len(tmpls) != 1 or tmpls[0]["id"]["proto"] != IPPROTO_ESP:
        return None
    tmpl = tmpls[0]
    return Policy(
        selector=_selector_from(msg["sel"]),
        direction=direction,
        tmpl_src=X.unpack_addr(tmpl["saddr"], tmpl["family"]),
        tmpl_dst=X.unpack_addr(tmpl["id"]["daddr"], tmpl["family"]),
        spi=tmpl["id"]["spi"] or None,
        priority=msg["priority"],
    )




def _error(what: str, exc: NetlinkError) -> IPsecError:
    reason = os.strerror(exc.code)
    if exc.code == errno.EPROTONOSUPPORT:
        reason += " (this kernel has no ESP: CONFIG_INET_ESP)"
    return IPsecError(f"{what}: {reason}")


class _SocketThread:
    """An XfrmSocket that lives on a thread of its own, every call made there.

    pyroute2's sync sockets drive an asyncio loop per thread, picking up the thread's running
    loop if there is one; called from a node program's event loop they fail ("This event loop
    is already running"). A dedicated thread has no running loop. Netlink calls are short, so
    the caller just waits for each result."""

    def __init__(self, factory: Callable[[], X.XfrmSocket]) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="xfrm")
        try:
            self._sock = self._pool.submit(factory).result()
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._sock, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._pool.submit(attr, *args, **kwargs).result()

    def close(self) -> None:
        try:
            self._pool.submit(self._sock.close).result()
        finally:
            self._pool.shutdown(wait=True)


class KernelBackend(IPsecBackend):
    """XFRM SAD/SPD of one namespace (see the module docstring)."""

    name = "kernel"

    def __init__(
        self,
        netns: str | None = None,
        on_expire: Callable[[SaExpired], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """`on_expire` runs on the listener thread, or via `loop.call_soon_threadsafe`."""
        self.netns = netns
        if netns is not None and not os.path.exists(f"/run/netns/{netns}"):
            raise IPsecError(f"no network namespace {netns!r} (/run/netns/{netns})")
        self._sock = _SocketThread(lambda: X.XfrmSocket(netns=netns))
        self._sas: dict[tuple[str, int], SecurityAssociation] = {}
        self._policies: dict[tuple[Selector, Direction], Policy] = {}
        self._lock = threading.Lock()  # guards the two dicts (the listener updates them)
        self._stat_fd: int | None = None
        with contextlib.suppress(OSError):  # absent without CONFIG_XFRM_STATISTICS
            self._stat_fd = in_netns(
                netns, lambda: os.open("/proc/thread-self/net/xfrm_stat", os.O_RDONLY)
            )
        self._stop_r, self._stop_w = -1, -1
        self._listener: threading.Thread | None = None
        self._closed = False
        if on_expire is not None:
            self._start_listener(on_expire, loop)

    def start(self) -> KernelBackend:
        return self  # nothing to start; here for symmetry with the userspace backend

    def __enter__(self) -> KernelBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- SAD -------------------------------------------------------------------------------

    def add_sa(self, sa: SecurityAssociation) -> None:
        msg = sa_message(sa)
        try:
            self._sock.sa_add(msg)
        except NetlinkError as exc:
            raise _error(f"add SA spi=0x{sa.spi:08x} {sa.src}->{sa.dst}", exc) from None
        with self._lock:
            self._sas[(sa.dst, sa.spi)] = sa
        log.info("SA added: %r", sa)

    def update_sa(self, sa: SecurityAssociation) -> None:
        """Change an SA in place; its sequence counter and replay state go on. The kernel's
        UPDSA changes only lifetimes, so other changes are done by replacement."""
        old = self.get_sa(sa.dst, sa.spi)
        if old is None:
            raise IPsecError(f"no SA spi=0x{sa.spi:08x} dst={sa.dst} to update")
        new = replace(sa, seq=max(sa.seq, old.seq), replay_top=max(sa.replay_top, old.replay_top))
        same = [
            (s.src, s.enc_alg, s.enc_key, s.auth_alg, s.auth_key, s.selector, s.replay_window)
            for s in (old, new)
        ]
        if same[0] == same[1]:
            try:
                self._sock.sa_add(sa_message(new), update=True)
            except NetlinkError as exc:
                raise _error(f"update SA spi=0x{sa.spi:08x} dst={sa.dst}", exc) from None
            with self._lock:
                self._sas[(sa.dst, sa.spi)] = new
        else:
            self._replace(old, new)
        log.info("SA updated: %r", new)

    def move_sa(
        self, dst: str, spi: int, new_src: str, new_dst: str, selector: Selector | None
    ) -> SecurityAssociation:
        """Put the SA (same SPI and keys) on new addresses and selector, keeping its sequence
        number and replay state: GETSA -> DELSA -> NEWSA, as strongSwan does (DESIGN §4)."""
        old = self.get_sa(dst, spi)
        if old is None:
            raise IPsecError(f"no SA spi=0x{spi:08x} dst={dst} to move")
        new = old.moved(new_src, new_dst, selector)
        self._replace(old, replace(new, stats={}))
        log.info("SA moved: %s->%s to %s->%s spi=0x%08x", old.src, dst, new_src, new_dst, spi)
        return new

    def _replace(self, old: SecurityAssociation, new: SecurityAssociation) -> None:
        msg = sa_message(new)  # validate before deleting anything
        self._delete(old.dst, old.spi)
        try:
            self._sock.sa_add(msg)
        except NetlinkError as exc:
            with contextlib.suppress(NetlinkError):  # put the old one back
                self._sock.sa_add(sa_message(old))
            raise _error(f"replace SA spi=0x{new.spi:08x} dst={new.dst}", exc) from None
        with self._lock:
            self._sas[(new.dst, new.spi)] = new

    def get_sa(self, dst: str, spi: int) -> SecurityAssociation | None:
        try:
            msg = self._sock.sa_get(dst, spi)
        except NetlinkError as exc:
            if exc.code == errno.ESRCH:
                return None
            raise _error(f"get SA spi=0x{spi:08x} dst={dst}", exc) from None
        return sa_from_message(msg)

    def delete_sa(self, dst: str, spi: int) -> None:
        self._delete(dst, spi)
        log.info("SA deleted: spi=0x%08x dst=%s", spi, dst)

    def _delete(self, dst: str, spi: int) -> None:
        try:
            self._sock.sa_delete(dst, spi)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:  # already gone is fine (expired, flushed)
                raise _error(f"delete SA spi=0x{spi:08x} dst={dst}", exc) from None
        with self._lock:
            self._sas.pop((dst, spi), None)

    def list_sas(self) -> list[SecurityAssociation]:
        """Every ESP transport SA in the namespace that the API can describe."""
        return [sa for sa in map(sa_from_message, self._sock.sa_dump()) if sa is not None]

    # ---- SPD -------------------------------------------------------------------------------

    def add_policy(self, policy: Policy) -> None:
        msg = policy_message(policy)
        try:
            self._sock.policy_add(msg)
        except NetlinkError as exc:
            what = f"add {policy.direction.value} policy {policy.selector}"
            raise _error(what, exc) from None
        with self._lock:
            self._policies[(policy.selector, policy.direction)] = policy
        log.info(
            "policy added: %s %s via %s->%s",
            policy.direction.value,
            policy.selector,
            policy.tmpl_src,
            policy.tmpl_dst,
        )

    def update_policy(self, policy: Policy) -> None:
        """XFRM_MSG_UPDPOLICY: the kernel swaps the policy with the same selector atomically."""
        try:
            self._sock.policy_add(policy_message(policy), update=True)
        except NetlinkError as exc:
            raise _error(f"update {policy.direction.value} policy {policy.selector}",
                         exc) from None
        with self._lock:
            self._policies[(policy.selector, policy.direction)] = policy
        log.info("policy updated: %s %s spi=%s", policy.direction.value, policy.selector,
                 policy.spi)

    def delete_policy(self, selector: Selector, direction: Direction) -> None:
        try:
            self._sock.policy_delete(_selector(selector), _DIRS[direction])
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise _error(f"delete {direction.value} policy {selector}", exc) from None
        with self._lock:
            self._policies.pop((selector, direction), None)
        log.info("policy deleted: %s %s", direction.value, selector)

    def list_policies(self) -> list[Policy]:
        dump = self._sock.policy_dump()
        return [p for p in map(policy_from_message, dump) if p is not None]

    # ---- counters and clean-up ---------------------------------------------------------------

    def xfrm_stat(self) -> dict[str, int]:
        """/proc/net/xfrm_stat of the namespace ({} without CONFIG_XFRM_STATISTICS)."""
        if self._stat_fd is None:
            return {}
        os.lseek(self._stat_fd, 0, os.SEEK_SET)
        text = os.read(self._stat_fd, 65536).decode()
        return {name: int(value) for name, value in (line.split() for line in text.splitlines())}

    def counters(self) -> dict[str, int]:
        """Namespace-wide drops from xfrm_stat (they outlive SAs); packets from the SAs."""
        sas = self.list_sas()
        result = {
            key: sum(sa.stats[key] for sa in sas)
            for key in ("integrity_failed", "replay_dropped", "packets_in", "packets_out")
        }
        result["no_sa"] = result["policy_dropped"] = 0
        stat = self.xfrm_stat()
        if stat:
            for key, names in _STAT_COUNTERS.items():
                result[key] = sum(stat.get(name, 0) for name in names)
        return result

    def flush(self) -> None:
        """Remove every SA and policy this instance installed (and nothing else)."""
        with self._lock:
            policies, sas = list(self._policies), list(self._sas)
        for selector, direction in policies:
            self.delete_policy(selector, direction)
        for dst, spi in sas:
            self._delete(dst, spi)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            if self._listener is not None:
                os.write(self._stop_w, b"x")
                self._listener.join(timeout=5)
                os.close(self._stop_r)
                os.close(self._stop_w)
            if self._stat_fd is not None:
                os.close(self._stat_fd)
            self._sock.close()

    # ---- expiry notifications ------------------------------------------------------------------

    def _start_listener(
        self, callback: Callable[[SaExpired], None], loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self._stop_r, self._stop_w = os.pipe()
        ready = threading.Event()
        failure: list[BaseException] = []

        def deliver(event: SaExpired) -> None:
            if event.hard:  # the kernel deleted it: nothing left for flush() to remove
                with self._lock:
                    self._sas.pop((event.dst, event.spi), None)
            if loop is not None:
                loop.call_soon_threadsafe(callback, event)
            else:
                callback(event)

        def run() -> None:
            try:
                sock = X.XfrmSocket(netns=self.netns, groups=X.XFRMGRP_EXPIRE)
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                self._listen(sock, deliver)
            finally:
                sock.close()

        self._listener = threading.Thread(target=run, name="xfrm-expire", daemon=True)
        self._listener.start()
        ready.wait()
        if failure:
            self._listener = None
            raise IPsecError(f"cannot subscribe to XFRM expire events: {failure[0]}")

    def _listen(self, sock: X.XfrmSocket, deliver: Callable[[SaExpired], None]) -> None:
        while True:
            ready, _, _ = select.select([sock.fileno(), self._stop_r], [], [])
            if self._stop_r in ready:
                return
            for msg in sock.get():
                if msg["header"]["type"] != X.XFRM_MSG_EXPIRE:
                    continue
                family = msg["family"]
                event = SaExpired(
                    src=X.unpack_addr(msg["saddr"], family),
                    dst=X.unpack_addr(msg["id"]["daddr"], family),
                    spi=msg["id"]["spi"],
                    hard=bool(msg["hard"]),
                )
                log.info(
                    "SA %s-expired: spi=0x%08x dst=%s",
                    "hard" if event.hard else "soft",
                    event.spi,
                    event.dst,
                )
                try:
                    deliver(event)
                except Exception:
                    log.exception("expire callback failed")
