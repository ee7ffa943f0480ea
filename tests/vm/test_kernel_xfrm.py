"""KernelBackend against a real XFRM with ESP (the distribution-kernel VM, `make test-kernel`).

Two namespaces on a veth: a (10.0.1.10, 10.0.2.10) and b (10.0.1.20, 10.0.2.20). `ip xfrm`
cross-checks what the backend says; tcpdump shows what is on the wire.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmnet import ENC_KEY, Capture, Pair, exchange, next_esp_frame, policies, sa, sh, sniff_esp

from nodes.ipsec import xfrm as X
from nodes.ipsec.api import IPsecError, SecurityAssociation
from nodes.ipsec.kernel import KernelBackend, SaExpired, policy_message

pytestmark = pytest.mark.vm

A1, A2, B1, B2 = "10.0.1.10", "10.0.2.10", "10.0.1.20", "10.0.2.20"
PA, PB = 5061, 5062
SPI_AB, SPI_BA = 0x1001, 0x2002  # the receiver's choice: b receives on 0x1001


def install(backend: KernelBackend, local: str, remote: str, lport: int, rport: int,
            out_spi: int, in_spi: int) -> None:  # fmt: skip
    backend.add_sa(sa(local, remote, out_spi, lport, rport))
    backend.add_sa(sa(remote, local, in_spi, rport, lport))
    for policy in policies(local, remote, lport, rport, out_spi):
        backend.add_policy(policy)


def test_udp_both_ways_only_esp_on_the_wire(pair: Pair) -> None:
    with KernelBackend(pair.a.name) as ka, KernelBackend(pair.b.name) as kb:
        install(ka, A1, B1, PA, PB, SPI_AB, SPI_BA)
        install(kb, B1, A1, PB, PA, SPI_BA, SPI_AB)
        cap = Capture(pair.b, "kernel-both-ways")
        with pair.a.udp(A1, PA) as sa_, pair.b.udp(B1, PB) as sb:
            assert exchange(sa_, sb, (B1, PB)) == 3
            assert exchange(sb, sa_, (A1, PA)) == 3
        lines = cap.lines("ESP(spi=0x0000", 6)
        assert len([x for x in lines if f"{A1} > {B1}: ESP(spi=0x00001001" in x]) >= 3, lines
        assert len([x for x in lines if f"{B1} > {A1}: ESP(spi=0x00002002" in x]) >= 3, lines
        assert not [line for line in lines if "UDP" in line], lines  # no plaintext at all
        assert ka.counters()["packets_out"] >= 3 and kb.counters()["packets_in"] >= 3
        assert "spi 0x00001001" in pair.a.xfrm_state()  # ip xfrm agrees with the backend
        assert "dir out" in pair.a.xfrm_policy() and "dir in" in pair.b.xfrm_policy()
        got = ka.get_sa(B1, SPI_AB)
        assert got is not None and got.seq >= 3 and got.enc_key == ENC_KEY


def test_add_get_update_delete_flush(pair: Pair) -> None:
    ns = pair.a
    with KernelBackend(ns.name) as kb:
        first = sa(A1, B1, 0x3003, PA, PB, lifetime_seconds=600, replay_window=16)
        kb.add_sa(first)
        with pytest.raises(IPsecError, match="exists"):
            kb.add_sa(first)
        got = kb.get_sa(B1, 0x3003)
        assert got is not None
        assert (got.src, got.dst, got.selector, got.replay_window, got.lifetime_seconds) == (
            A1, B1, first.selector, 16, 600)  # fmt: skip
        assert (got.enc_key, got.auth_key, got.auth_alg) == (first.enc_key, first.auth_key,
                                                             "hmac-sha-256-128")  # fmt: skip
        assert "keys=<hidden>" in repr(got) and "0102" not in repr(got)
        # lifetime change: UPDSA in place
        kb.update_sa(sa(A1, B1, 0x3003, PA, PB, lifetime_seconds=0, replay_window=16))
        assert kb.get_sa(B1, 0x3003).lifetime_seconds is None  # 0 = no limit
        assert "hard 0(sec)" in sh("ip", "-n", ns.name, "-s", "xfrm", "state")  # no hard expiry
        # new keys: replacement (UPDSA cannot change keys)
        rekeyed = SecurityAssociation(A1, B1, 0x3003, "aes-cbc", bytes(16), "hmac-sha-1-96",
                                      bytes(20), selector=first.selector)  # fmt: skip
        kb.update_sa(rekeyed)
        assert kb.get_sa(B1, 0x3003).auth_alg == "hmac-sha-1-96"
        assert "hmac(sha1)" in ns.xfrm_state()
        with pytest.raises(IPsecError, match="no SA"):
            kb.update_sa(sa(A1, B1, 0x3999, PA, PB))
        # bad input: refused before the kernel is asked, nothing changes
        with pytest.raises(ValueError, match="replay window"):
            kb.add_sa(sa(A1, B1, 0x3004, PA, PB, replay_window=64))
        assert kb.get_sa(B1, 0x3004) is None
        assert {s.spi for s in kb.list_sas()} == {0x3003}
        kb.delete_sa(B1, 0x3003)
        kb.delete_sa(B1, 0x3003)  # already gone: fine
        assert kb.get_sa(B1, 0x3003) is None
        # flush removes only this instance's SAs and policies
        ns.ip("xfrm", "state", "add", "src", B1, "dst", A1, "proto", "esp", "spi", "0x4004",
              "mode", "transport", "enc", "cbc(aes)", "0x" + "11" * 16,
              "auth-trunc", "hmac(sha256)", "0x" + "22" * 32, "128")  # fmt: skip
        install(kb, A1, B1, PA, PB, SPI_AB, SPI_BA)
        assert len(kb.list_policies()) == 2
        kb.flush()
        assert kb.list_policies() == [] and {s.spi for s in kb.list_sas()} == {0x4004}
    assert "0x00004004" in ns.xfrm_state()  # close() left the foreign SA alone too


def test_tampered_and_replayed_packets_are_dropped_and_counted(pair: Pair) -> None:
    with KernelBackend(pair.a.name) as ka, KernelBackend(pair.b.name) as kb:
        install(ka, A1, B1, PA, PB, SPI_AB, SPI_BA)
        install(kb, B1, A1, PB, PA, SPI_BA, SPI_AB)
        with pair.a.udp(A1, PA) as tx, pair.b.udp(B1, PB) as rx, sniff_esp(pair.a, A1) as raw:
            assert exchange(tx, rx, (B1, PB), count=1) == 1
            frame = next_esp_frame(raw, A1)
            before = kb.counters()
            raw.send(frame)  # replayed as is
            esp = 14 + (frame[14] & 0x0F) * 4
            seq = struct.unpack_from(">I", frame, esp + 4)[0]
            tampered = bytearray(frame)
            struct.pack_into(">I", tampered, esp + 4, seq + 100)  # fresh seq, so the ICV fails
            raw.send(bytes(tampered))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                now = kb.counters()
                if (now["replay_dropped"] > before["replay_dropped"]
                        and now["integrity_failed"] > before["integrity_failed"]):  # fmt: skip
                    break
                time.sleep(0.2)
            assert now["replay_dropped"] == before["replay_dropped"] + 1, now
            assert now["integrity_failed"] == before["integrity_failed"] + 1, now
            stats = kb.get_sa(B1, SPI_AB).stats
            assert stats["integrity_failed"] == 1 and stats["replay_dropped"] == 1
            rx.setblocking(False)
            with pytest.raises(BlockingIOError):  # neither reached the socket
                rx.recv(2048)
            assert exchange(tx, rx, (B1, PB), count=1) == 1  # the SA still works


def test_moving_the_sa_pair_keeps_traffic_flowing(pair: Pair) -> None:
    with KernelBackend(pair.a.name) as ka, KernelBackend(pair.b.name) as kb:
        install(ka, A1, B1, PA, PB, SPI_AB, SPI_BA)
        install(kb, B1, A1, PB, PA, SPI_BA, SPI_AB)
        with pair.a.udp(A1, PA) as sa_, pair.b.udp(B1, PB) as sb:
            assert exchange(sa_, sb, (B1, PB)) == 3 and exchange(sb, sa_, (A1, PA)) == 3
        seq_before = ka.get_sa(B1, SPI_AB).seq  # a's outbound
        top_before = kb.get_sa(B1, SPI_AB).replay_top  # b's inbound, same SPI
        assert seq_before == top_before >= 3
        for kx, local, remote, new_local, new_remote, out_spi, in_spi, lp, rp in (
            (ka, A1, B1, A2, B2, SPI_AB, SPI_BA, PA, PB),
            (kb, B1, A1, B2, A2, SPI_BA, SPI_AB, PB, PA),
        ):
            for old in policies(local, remote, lp, rp, out_spi):
                kx.delete_policy(old.selector, old.direction)
            out_sel = policies(new_local, new_remote, lp, rp, out_spi)[0].selector
            kx.move_sa(remote, out_spi, new_local, new_remote, out_sel)
            kx.move_sa(local, in_spi, new_remote, new_local, policies(
                new_local, new_remote, lp, rp, out_spi)[1].selector)  # fmt: skip
            for new in policies(new_local, new_remote, lp, rp, out_spi):
                kx.add_policy(new)
        moved = ka.get_sa(B2, SPI_AB)
        assert moved is not None and ka.get_sa(B1, SPI_AB) is None
        assert moved.seq == seq_before and moved.enc_key == ENC_KEY
        assert kb.get_sa(B2, SPI_AB).replay_top == top_before  # b's replay state carried over
        replay_before = kb.counters()["replay_dropped"]
        cap = Capture(pair.b, "kernel-moved")
        with pair.a.udp(A2, PA) as sa_, pair.b.udp(B2, PB) as sb:
            assert exchange(sa_, sb, (B2, PB)) == 3 and exchange(sb, sa_, (A2, PA)) == 3
        lines = cap.lines("ESP(spi=0x0000", 6)
        assert len([x for x in lines if f"{A2} > {B2}: ESP(spi=0x00001001" in x]) >= 3, lines
        assert len([x for x in lines if f"{B2} > {A2}: ESP(spi=0x00002002" in x]) >= 3, lines
        assert not [x for x in lines if "UDP" in x], lines
        assert ka.get_sa(B2, SPI_AB).seq > seq_before  # the sequence went on, not restarted
        assert kb.counters()["replay_dropped"] == replay_before
        assert kb.get_sa(B2, SPI_AB).replay_top > top_before


def test_expire_notifications(pair: Pair) -> None:
    events: list[SaExpired] = []
    with KernelBackend(pair.a.name, on_expire=events.append) as ka:
        ka.add_sa(sa(A1, B1, 0x5005, PA, PB, lifetime_seconds=2))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(e.hard for e in events):
            time.sleep(0.2)
        assert [e.hard for e in events if e.spi == 0x5005][-2:] == [False, True]
        assert events[-1] == SaExpired(A1, B1, 0x5005, True)
        assert ka.get_sa(B1, 0x5005) is None


def test_nothing_left_after_close(pair: Pair) -> None:
    backend = KernelBackend(pair.a.name)
    install(backend, A1, B1, PA, PB, SPI_AB, SPI_BA)
    assert pair.a.xfrm_state().count("proto esp") == 2
    backend.close()
    backend.close()  # idempotent
    assert pair.a.xfrm_state() == "" and pair.a.xfrm_policy() == ""


NODE = Path(__file__).with_name("xfrm_node.py")


def test_nothing_left_after_sigterm_of_a_node(pair: Pair) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen([sys.executable, str(NODE), pair.b.name, B1, A1], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == "ready"
        assert pair.b.xfrm_state().count("proto esp") == 2 and "dir in" in pair.b.xfrm_policy()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert pair.b.xfrm_state() == "" and pair.b.xfrm_policy() == ""


def test_xfrm_migrate_moves_the_sa_not_a_transport_policy(pair: Pair) -> None:
    """XFRM_MSG_MIGRATE (the optional optimisation), keyed by policy selector and direction,
    moves the SA to new addresses (same SPI, keys, sequence number). The kernel rewrites
    template endpoints only in tunnel/BEET mode and never a selector: in transport mode the
    policy stays as it was, which is why move_sa() replaces SAs and policies instead."""
    out = policies(A1, B1, PA, PB, 0x8008)[0]
    with KernelBackend(pair.a.name) as ka, X.XfrmSocket(netns=pair.a.name) as sock:
        ka.add_sa(sa(A1, B1, 0x8008, PA, PB, seq=5))
        ka.add_policy(out)
        move = {"old_daddr": B1, "old_saddr": A1, "new_daddr": B2, "new_saddr": A2,
                "proto": 50, "mode": X.XFRM_MODE_TRANSPORT, "old_family": 2, "new_family": 2}
        sock.migrate(policy_message(out)["sel"], X.XFRM_POLICY_OUT, [move])  # fmt: skip
        assert ka.get_sa(B1, 0x8008) is None
        moved = ka.get_sa(B2, 0x8008)
        assert moved is not None and (moved.src, moved.seq, moved.enc_key) == (A2, 5, ENC_KEY)
        assert f"tmpl src {A1} dst {B1}" in pair.a.xfrm_policy()  # transport: untouched
        ka.delete_sa(B2, 0x8008)  # not one this instance installed under that address
