"""Wire-identical ESP: namespace a on the kernel backend (XFRM), b on the userspace backend
(RFC 4303 engine on a TUN), the same SAs, UDP both ways; only ESP on the veth. Runs in the
distribution-kernel VM (`make test-kernel`), where a's kernel really does ESP."""

from __future__ import annotations

import pytest
from vmnet import Capture, Pair, exchange, policies, sa

from nodes.ipsec.kernel import KernelBackend

pytestmark = pytest.mark.vm

A1, B1 = "10.0.1.10", "10.0.1.20"
PA, PB = 5071, 5072
SPI_AB, SPI_BA = 0x1101, 0x2202


def test_kernel_and_userspace_backends_talk_both_ways(pair: Pair) -> None:
    userspace = pytest.importorskip("nodes.ipsec.userspace", reason="no userspace backend yet")
    with KernelBackend(pair.a.name) as ka, userspace.UserspaceBackend(netns=pair.b.name) as ub:
        ub.start()
        for backend, local, remote, lport, rport, out_spi, in_spi in (
            (ka, A1, B1, PA, PB, SPI_AB, SPI_BA),
            (ub, B1, A1, PB, PA, SPI_BA, SPI_AB),
        ):
            backend.add_sa(sa(local, remote, out_spi, lport, rport))
            backend.add_sa(sa(remote, local, in_spi, rport, lport))
            for policy in policies(local, remote, lport, rport, out_spi):
                backend.add_policy(policy)
        cap = Capture(pair.a, "interop")
        with pair.a.udp(A1, PA) as sa_, pair.b.udp(B1, PB) as sb:
            assert exchange(sa_, sb, (B1, PB), count=5) == 5  # kernel -> userspace
            assert exchange(sb, sa_, (A1, PA), count=5) == 5  # userspace -> kernel
        lines = cap.lines("ESP(spi=0x0000", 10)
        assert len([x for x in lines if f"{A1} > {B1}: ESP(spi=0x00001101" in x]) >= 5, lines
        assert len([x for x in lines if f"{B1} > {A1}: ESP(spi=0x00002202" in x]) >= 5, lines
        assert not [x for x in lines if "UDP" in x], lines
        # each side accepted the other's packets: no integrity or replay failures anywhere
        kc, uc = ka.counters(), ub.counters()
        assert kc["integrity_failed"] == 0 and uc["integrity_failed"] == 0, (kc, uc)
        assert ka.get_sa(A1, SPI_BA).replay_top >= 5  # the kernel took userspace's ESP
        assert ub.get_sa(B1, SPI_AB).replay_top >= 5  # and the reverse
