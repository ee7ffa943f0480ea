"""Userspace ESP backend: RFC 4303 transport mode on a TUN device, for kernels without ESP.

Use (inside a node process, in its namespace, as root)::

    backend = UserspaceBackend(netns=None, esp_sa_path=run_dir / "esp_sa")
    backend.start()                   # TUN, nft table, ip rule; engine thread
    close_on_signal(backend)          # SIGTERM/SIGINT/exit remove everything
    backend.add_sa(sa); backend.add_policy(policy); ...
    backend.move_sa(dst, spi, new_src, new_dst, selector)   # atomic re-addressing
    backend.close()

or `run_until_signal(backend)` in a process that only runs the engine. The engine is a daemon
thread; the IPsecBackend methods are synchronous and thread-safe (an SPD change rewrites the
nft rules: under 1 ms through libnftables, 15-20 ms where only the `nft` program is there).
`counters()` adds the nft plaintext drops to the engine's counts.

`netns` is a name under /run/netns or a path like /proc/PID/ns/net; None = the current one.

How packets flow (per instance: TUN `smespXXXXXX`, nft table `ip smig_esp_XXXXXX`, a fwmark
ip rule and its own routing table):
* Outbound: an nft `route` chain marks packets matching an OUT policy; the ip rule routes
  marked packets to the TUN; the engine reads them, ESP-protects the transport payload and sends
  the ESP packet with the original IPv4 header (protocol 50, same ID/TTL/TOS/DF, as Linux does)
  through an IPPROTO_RAW socket; if it exceeds the MTU, a plain raw ESP socket lets the kernel
  fragment it (outer fragmentation, as XFRM).
* Inbound: the kernel has no ESP handler, so a raw IPPROTO_ESP socket gets every ESP packet;
  the engine looks up (dst, SPI), checks replay, ICV, decrypts, checks the IN policy template,
  and writes the inner packet into the TUN (rp_filter off there) for normal local delivery.
  The inner UDP checksum stays valid: transport-mode addresses are the outer ones.
* IN policies also add an nft input rule dropping matching plaintext that did not come from
  the TUN; its named counter is `policy_dropped`.
Only one instance per namespace should receive ESP (every raw ESP socket gets a copy).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from nodes.ipsec import esp
from nodes.ipsec.api import (
    IPPROTO_ESP,
    Direction,
    IPsecBackend,
    IPsecError,
    Policy,
    SecurityAssociation,
    Selector,
)
from nodes.ipsec.esp_sa import EspSaFile
from nodes.ipsec.netns import in_netns, netns_path
from nodes.ipsec.nft import Nft
from nodes.ipsec.spd import (
    Ipv4Packet,
    Spd,
    check_ipv4,
    check_policy,
    nft_ruleset,
    template_accepts,
)

log = logging.getLogger("smig.ipsec.userspace")
T = TypeVar("T")

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_IP_PKTINFO, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT = 8, 10, 0
TUN_MTU = 65000  # big: the kernel must not fragment before ESP (Linux fragments the outer packet)
COUNTERS = ("integrity_failed", "replay_dropped", "no_sa", "policy_dropped", "packets_in",
            "packets_out", "malformed", "send_failed")






class UserspaceBackend(IPsecBackend):
    """ESP engine on a TUN device with its own SPD/SAD (see the module docstring)."""

    name = "userspace"

    def __init__(self, netns: str | None = None, esp_sa_path: str | os.PathLike[str] | None = None,
                 nft_in_process: bool = True) -> None:
        self.netns = netns
        self._nft_in_process = nft_in_process  # False: always run the nft program
        self._nft = Nft(netns, in_process=False)  # the real one is made in start()
        self._esp_sa = EspSaFile(esp_sa_path) if esp_sa_path else None
        tag = secrets.token_hex(3)
        self.tun = f"smesp{tag}"
        self.table = f"smig_esp_{tag}"
        number = int(tag, 16) % 50000
        self.mark = 0x5E000000 + number
        self.route_table = 10000 + number
        self._lock = threading.RLock()
        self._sad: dict[tuple[str, int], esp.SaState] = {}
        self._expiry: dict[tuple[str, int], float] = {}
        self._moved: dict[tuple[str, str, int], tuple[tuple[str, int], float]] = {}
        self._spd = Spd()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._tun_fd: int | None = None
        self._rx: socket.socket | None = None
        self._tx: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._installed: list[list[str]] = []  # undo commands, run in reverse on close
        self._restore_rp_filter = False
        self._started = False
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the TUN, sockets, nft table and ip rule, then start the engine thread."""
        if self._started:
            return
        self._started = True
        try:
            self._tun_fd, self._rx, self._tx = in_netns(self.netns, self._open_devices)
            self._nft = Nft(self.netns, self._nft_in_process)
            self._configure()
        except BaseException:
            self.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"esp-{self.tun}", daemon=True)
        self._thread.start()
        log.info("userspace ESP engine up: tun %s, nft table %s (%s), mark 0x%x, table %d",
                 self.tun, self.table, self._nft.mode, self.mark, self.route_table)

    def _open_devices(self) -> tuple[int, socket.socket, socket.socket]:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            ifr = struct.pack("16sH", self.tun.encode(), _IFF_TUN | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
            rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP)
            rx.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT)
            tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._set_sysctls()
        except BaseException:
            os.close(fd)
            raise
        return fd, rx, tx

    def _set_sysctls(self) -> None:
        # Decrypted packets enter on the TUN from remote sources routed elsewhere: a strict
        # rp_filter (the effective value is max(all, dev)) would drop them. Loose mode suffices.
        v6 = Path(f"/proc/sys/net/ipv6/conf/{self.tun}/disable_ipv6")
        if v6.exists():  # IPv4-only engine: no router solicitations into the TUN
            v6.write_text("1")
        conf = Path("/proc/sys/net/ipv4/conf")
        (conf / self.tun / "rp_filter").write_text("0")
        if (conf / "all" / "rp_filter").read_text().strip() == "1":
            (conf / "all" / "rp_filter").write_text("2")
            self._restore_rp_filter = True
            log.info("net.ipv4.conf.all.rp_filter 1 -> 2 (loose) for ESP delivery via the TUN")

    def _reset_sysctls(self) -> None:
        if self._restore_rp_filter:
            Path("/proc/sys/net/ipv4/conf/all/rp_filter").write_text("1")
            self._restore_rp_filter = False

    def _cmd(self, *args: str) -> str:
        if args[0] == "nft":  # in-process where libnftables is there
            return self._nft.run(" ".join(args[1:]) + "\n")
        argv = list(args)
        path = netns_path(self.netns)
        if path is not None:
            argv = ["nsenter", f"--net={path}", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        if done.returncode != 0:
            raise IPsecError(f"{' '.join(args[:3])} failed: {done.stderr.strip()}")
        return done.stdout

    def _configure(self) -> None:
        self._cmd("ip", "link", "set", self.tun, "mtu", str(TUN_MTU), "up")
        self._cmd("ip", "route", "add", "default", "dev", self.tun, "table", str(self.route_table))
        self._installed.append(["ip", "route", "flush", "table", str(self.route_table)])
        self._cmd("ip", "rule", "add", "fwmark", str(self.mark), "lookup", str(self.route_table),
                  "priority", "100")
        self._installed.append(["ip", "rule", "del", "fwmark", str(self.mark), "lookup",
                                str(self.route_table), "priority", "100"])
        self._installed.append(["nft", "delete", "table", "ip", self.table])
        self._sync_nft()

    def _sync_nft(self) -> None:
        if not self._started or self._closed:
            return
        self._nft.run(nft_ruleset(self.table, self.tun, self.mark, self._spd.policies()))

    def close(self) -> None:
        """Stop the engine and remove the TUN, nft table, ip rule and route. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
        for undo in reversed(self._installed):
            try:
                self._cmd(*undo)
            except (IPsecError, OSError, subprocess.SubprocessError) as exc:
                log.warning("cleanup step %s: %s", " ".join(undo[:3]), exc)
        self._installed.clear()
        try:
            in_netns(self.netns, self._reset_sysctls)
        except OSError as exc:
            log.warning("cleanup step rp_filter: %s", exc)
        for sock in (self._rx, self._tx):
            if sock is not None:
                sock.close()
        for fd in (self._tun_fd, self._wake_r, self._wake_w):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._tun_fd = None  # closing the fd deletes the (non-persistent) TUN
        with self._lock:
            self._sad.clear()
            self._spd.clear()
        if self._started:
            log.info("userspace ESP engine %s closed", self.tun)

    def __enter__(self) -> UserspaceBackend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- SAD -------------------------------------------------------------------------------

    def add_sa(self, sa: SecurityAssociation) -> None:
        check_ipv4(sa.src, sa.dst)
        key = (sa.dst, sa.spi)
        with self._lock:
            if key in self._sad:
                raise IPsecError(f"SA spi=0x{sa.spi:08x} dst={sa.dst} already exists")
            self._sad[key] = esp.SaState(replace(sa, stats={}))
            if sa.lifetime_seconds:
                self._expiry[key] = time.monotonic() + sa.lifetime_seconds
        if self._esp_sa is not None:
            self._esp_sa.add(sa)
        log.info("SA added: %r", sa)

    def update_sa(self, sa: SecurityAssociation) -> None:
        """Replace the SA's parameters; its sequence counter and replay window go on."""
        key = (sa.dst, sa.spi)
        with self._lock:
            old = self._sad.get(key)
            if old is None:
                raise IPsecError(f"no SA spi=0x{sa.spi:08x} dst={sa.dst} to update")
            new = replace(sa, seq=max(sa.seq, old.sa.seq), replay_top=old.sa.replay_top,
                          stats={})
            state = esp.SaState(new, stats=old.stats)
            state.window = old.window
            self._sad[key] = state
            self._expiry.pop(key, None)
            if sa.lifetime_seconds:
                self._expiry[key] = time.monotonic() + sa.lifetime_seconds
        if self._esp_sa is not None and (sa.enc_key, sa.auth_key) != (old.sa.enc_key,
                                                                      old.sa.auth_key):
            self._esp_sa.add(sa)
        log.info("SA updated: %r", sa)

    def move_sa(self, dst: str, spi: int, new_src: str, new_dst: str,
                selector: Selector | None) -> SecurityAssociation:
        """Atomically re-address an SA (DESIGN §4: replacement): same SPI and keys, and the
        live sequence counter and replay window, so no packet in flight is refused as a
        replay or sent with a reused sequence number. Works when only the source changes."""
        check_ipv4(new_src, new_dst)
        with self._lock:
            old = self._sad.get((dst, spi))
            if old is None:
                raise IPsecError(f"no SA spi=0x{spi:08x} dst={dst} to move")
            if new_dst != dst and (new_dst, spi) in self._sad:
                raise IPsecError(f"SA spi=0x{spi:08x} dst={new_dst} already exists")
            moved = old.sa.moved(new_src, new_dst, selector)
            state = esp.SaState(moved, stats=old.stats)
            state.window = old.window
            del self._sad[(dst, spi)]
            self._sad[(new_dst, spi)] = state
            # Packets already queued on the TUN under the old addresses still go out on this
            # SA (its sequence numbers continue): the kernel transforms at send time and has
            # no such queue, so it never drops them; neither should we.
            self._moved[(old.sa.src, dst, spi)] = ((new_dst, spi), time.monotonic() + 2.0)
            expiry = self._expiry.pop((dst, spi), None)
            if expiry is not None:
                self._expiry[(new_dst, spi)] = expiry
        if self._esp_sa is not None:
            self._esp_sa.add(moved)
        log.info("SA moved: %s -> %r", dst, moved)
        return replace(moved, stats=dict(state.stats))

    def get_sa(self, dst: str, spi: int) -> SecurityAssociation | None:
        with self._lock:
            state = self._sad.get((dst, spi))
            return None if state is None else replace(state.sa, stats=dict(state.stats))

    def delete_sa(self, dst: str, spi: int) -> None:
        with self._lock:
            gone = self._sad.pop((dst, spi), None)
            self._expiry.pop((dst, spi), None)
        if gone is not None:
            log.info("SA deleted: %r", gone.sa)

    def list_sas(self) -> list[SecurityAssociation]:
        with self._lock:
            return [replace(s.sa, stats=dict(s.stats)) for s in self._sad.values()]

    # ---- SPD -------------------------------------------------------------------------------

    def add_policy(self, policy: Policy) -> None:
        check_policy(policy)  # malformed: ValueError, nothing changed
        with self._lock:
            try:
                self._spd.add(policy)
            except ValueError as exc:  # a duplicate
                raise IPsecError(str(exc)) from exc
            try:
                self._sync_nft()
            except (IPsecError, ValueError):
                self._spd.delete(policy.selector, policy.direction)
                raise
        log.info("policy added: %s %s via %s->%s", policy.direction.value, policy.selector,
                 policy.tmpl_src, policy.tmpl_dst)

    def update_policy(self, policy: Policy) -> None:
        """Atomic under the engine lock: no packet sees the SPD without the policy."""
        check_policy(policy)
        with self._lock:
            old = next((p for p in self._spd.policies(policy.direction)
                        if p.selector == policy.selector), None)
            self._spd.delete(policy.selector, policy.direction)
            try:
                self._spd.add(policy)
                self._sync_nft()
            except (IPsecError, ValueError):
                self._spd.delete(policy.selector, policy.direction)
                if old is not None:
                    self._spd.add(old)
                raise
        log.info("policy updated: %s %s spi=%s", policy.direction.value, policy.selector,
                 policy.spi)

    def add_policies(self, policies: list[Policy]) -> None:
        """Several policies with one nft update (each update is a process run)."""
        for policy in policies:
            check_policy(policy)
        with self._lock:
            added: list[Policy] = []
            try:
                for policy in policies:
                    self._spd.add(policy)
                    added.append(policy)
                self._sync_nft()
            except (IPsecError, ValueError) as exc:
                for policy in added:
                    self._spd.delete(policy.selector, policy.direction)
                raise IPsecError(str(exc)) from exc
        for policy in policies:
            log.info("policy added: %s %s via %s->%s", policy.direction.value,
                     policy.selector, policy.tmpl_src, policy.tmpl_dst)

    def delete_policies(self, keys: list[tuple[Selector, Direction]]) -> None:
        with self._lock:
            gone = [k for k in keys if self._spd.delete(*k)]
            if gone:
                self._sync_nft()
        for selector, direction in gone:
            log.info("policy deleted: %s %s", direction.value, selector)

    def delete_policy(self, selector: Selector, direction: Direction) -> None:
        with self._lock:
            if self._spd.delete(selector, direction):
                self._sync_nft()
                log.info("policy deleted: %s %s", direction.value, selector)

    def list_policies(self) -> list[Policy]:
        with self._lock:
            return self._spd.policies()

    def flush(self) -> None:
        with self._lock:
            self._sad.clear()
            self._expiry.clear()
            self._spd.clear()
            self._sync_nft()

    def counters(self) -> dict[str, int]:
        with self._lock:
            result = dict(self._counters)
        result["policy_dropped"] += self._nft_policy_drops()
        return result

    def _nft_policy_drops(self) -> int:
        if not self._started or self._closed:
            return 0
        return self._nft.counter_packets(self.table, "policy_drops")

    # ---- engine ----------------------------------------------------------------------------

    def _count(self, name: str, spi: int = 0, seq: int = 0) -> None:
        self._counters[name] += 1
        if name not in ("packets_in", "packets_out"):
            log.debug("dropped (%s) spi=0x%08x seq=%d", name, spi, seq)

    def _run(self) -> None:
        assert self._tun_fd is not None and self._rx is not None
        sel = selectors.DefaultSelector()
        sel.register(self._tun_fd, selectors.EVENT_READ, "out")
        sel.register(self._rx, selectors.EVENT_READ, "in")
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "stop":
                        return
                    try:
                        if key.data == "out":
                            self._outbound(os.read(self._tun_fd, 65535))
                        else:
                            self._inbound(self._rx.recv(65535))
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EINTR):
                            log.warning("engine I/O error: %s", exc)
                    except Exception:  # one bad packet must not stop the engine
                        log.exception("engine error on an %sbound packet", key.data)
                        self._count("malformed")
                self._expire()
        except Exception:
            log.exception("userspace ESP engine stopped")
        finally:
            sel.close()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, t in self._expiry.items() if t <= now]:
                log.info("SA expired: spi=0x%08x dst=%s", key[1], key[0])
                self._sad.pop(key, None)
                self._expiry.pop(key)

    def _outbound(self, data: bytes) -> None:
        if not data or data[0] >> 4 != 4:
            return  # not IPv4 (IPv6 is off on the TUN; nothing else is routed to it)
        with self._lock:
            try:
                packet = Ipv4Packet.parse(data)
            except ValueError:
                self._count("malformed")
                return
            if packet.is_fragment:  # cannot happen with our TUN MTU unless a sender forces it
                self._count("malformed")
                return
            policy = self._spd.lookup(packet, Direction.OUT)
            if policy is None:  # marked by a rule that was just removed
                self._count("policy_dropped")
                return
            state = self._out_sa(policy, packet)
            if state is None:
                self._count("no_sa")
                return
            try:
                wire = state.send(packet.payload, packet.proto)
            except OverflowError as exc:
                log.warning("%s", exc)
                self._count("no_sa")
                return
            self._count("packets_out")
        self._send(packet.with_payload(IPPROTO_ESP, wire))

    def _out_sa(self, policy: Policy, packet: Ipv4Packet) -> esp.SaState | None:
        """As XFRM: an SA fits if it satisfies the template and its own selector (if any)
        covers the packet; SAs with a selector win over catch-alls (sec-agree has four SAs
        between the same two addresses, told apart by ports)."""
        fits = [s for s in self._sad.values()
                if template_accepts(policy, s.sa)
                and (s.sa.selector is None or packet.matches(s.sa.selector))]
        fits.sort(key=lambda s: s.sa.selector is None)
        if fits:
            return fits[0]
        if policy.spi is not None:  # an SA moved while this packet waited on the TUN
            alias = self._moved.get((policy.tmpl_src, policy.tmpl_dst, policy.spi))
            if alias is not None and alias[1] > time.monotonic():
                return self._sad.get(alias[0])
        return None

    def _send(self, packet: Ipv4Packet) -> None:
        assert self._tx is not None and self._rx is not None
        # The source address goes along (IP_PKTINFO) so the route is looked up as for the
        # original packet: source-based rules of a multi-homed host pick its interface, as
        # XFRM's transport mode keeps the original route (Fig 4 moves media by source).
        pktinfo = struct.pack("=I4s4s", 0, socket.inet_aton(packet.src), bytes(4))
        try:
            self._tx.sendmsg([packet.serialize()], [(socket.IPPROTO_IP, _IP_PKTINFO, pktinfo)],
                             0, (packet.dst, 0))
            return
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                log.debug("ESP send to %s failed: %s", packet.dst, exc)
                self._count("send_failed")
                return
        # Too big for one frame: let the kernel build the header and fragment the ESP packet.
        ancillary = [(socket.IPPROTO_IP, _IP_PKTINFO, pktinfo),
                     (socket.IPPROTO_IP, socket.IP_TTL, struct.pack("=i", packet.ttl))]
        try:
            self._rx.sendmsg([packet.payload], ancillary, 0, (packet.dst, 0))
        except OSError as exc:
            log.debug("fragmented ESP send to %s failed: %s", packet.dst, exc)
            self._count("send_failed")

    def _inbound(self, data: bytes) -> None:
        try:
            packet = Ipv4Packet.parse(data)
            spi = esp.EspPacket.peek_spi(packet.payload)
        except ValueError:
            self._count("malformed")
            return
        with self._lock:
            seq = int.from_bytes(packet.payload[4:8], "big")
            state = self._sad.get((packet.dst, spi))
            if state is None:
                self._count("no_sa", spi, seq)
                return
            try:
                trailer = state.receive(packet.payload)
            except esp.ReplayError:
                self._count("replay_dropped", spi, seq)
                return
            except esp.IntegrityError:
                self._count("integrity_failed", spi, seq)
                return
            except ValueError:
                self._count("malformed", spi, seq)
                return
            inner = packet.with_payload(trailer.next_header, trailer.payload)
            if not self._inbound_allowed(inner, state.sa):
                self._count("policy_dropped", spi, seq)
                return
            self._count("packets_in")
        assert self._tun_fd is not None
        os.write(self._tun_fd, inner.serialize())

    def _inbound_allowed(self, inner: Ipv4Packet, sa: SecurityAssociation) -> bool:
        """As XFRM's inbound policy check: the SA's own selector must cover the packet and
        the IN policy's template must fit the SA — in transport mode that is protocol and
        (if pinned) SPI; addresses are compared only for tunnels (xfrm_state_ok)."""
        if sa.selector is not None and not inner.matches(sa.selector):
            return False
        policy = self._spd.lookup(inner, Direction.IN)
        return policy is None or policy.spi is None or policy.spi == sa.spi


def close_on_signal(backend: IPsecBackend,
                    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Close `backend` at interpreter exit and on SIGTERM/SIGINT (then exit 128+signal).
    Call from the main thread of the node process."""
    atexit.register(backend.close)

    def handler(signum: int, _frame: object) -> None:
        backend.close()
        raise SystemExit(128 + signum)

    for sig in signals:
        signal.signal(sig, handler)


def run_until_signal(backend: UserspaceBackend,
                     signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Start `backend`, block until one of `signals`, close it; returns the signal number."""
    sigs = list(signals)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        backend.start()
        signum = signal.sigwait(sigs)
    finally:
        backend.close()
        with contextlib.suppress(OSError):
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return int(signum)
