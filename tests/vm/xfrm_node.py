"""A minimal node process for the SIGTERM test: installs an SA pair and policies with the
kernel backend in namespace argv[1] (local argv[2], remote argv[3]), prints "ready", waits.
On SIGTERM it closes the backend and exits 128+15, as the lab's nodes do."""

from __future__ import annotations

import signal
import sys

from vmnet import policies, sa

from nodes.ipsec.kernel import KernelBackend


def main() -> int:
    netns, local, remote = sys.argv[1:4]

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the `with` below

    signal.signal(signal.SIGTERM, on_signal)
    with KernelBackend(netns) as backend:
        backend.add_sa(sa(local, remote, 0x6006, 5062, 5061))
        backend.add_sa(sa(remote, local, 0x7007, 5061, 5062))
        for policy in policies(local, remote, 5062, 5061, 0x6006):
            backend.add_policy(policy)
        print("ready", flush=True)
        while True:
            signal.pause()


if __name__ == "__main__":
    sys.exit(main())
