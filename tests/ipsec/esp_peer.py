"""Test helper process: a UserspaceBackend plus UDP sockets, driven by JSON lines on stdin.

Run inside a namespace (`ip netns exec NS .venv/bin/python tests/ipsec/esp_peer.py`). Each
request line is {"op": ..., ...}; each answer line is {"ok": true, ...} or {"ok": false,
"error": "..."}. Prints {"ready": true, "tun": ..., "table": ..., "pid": ...} once started.
SIGTERM closes the backend (the cleanup path under test). Test keys only: never real ones.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nodes.ipsec.api import Direction, Policy, SecurityAssociation, Selector
from nodes.ipsec.userspace import UserspaceBackend, close_on_signal


def sa_from(d: dict[str, Any]) -> SecurityAssociation:
    sel = d.get("selector")
    return SecurityAssociation(
        d["src"], d["dst"], d["spi"], d["enc_alg"], bytes.fromhex(d["enc_key"]),
        d["auth_alg"], bytes.fromhex(d["auth_key"]),
        selector=Selector(**sel) if sel else None,
        replay_window=d.get("replay_window", 32),
    )


def policy_from(d: dict[str, Any]) -> Policy:
    return Policy(Selector(**d["selector"]), Direction(d["direction"]), d["tmpl_src"],
                  d["tmpl_dst"], d.get("spi"))


class Peer:
    def __init__(self, esp_sa_path: str | None) -> None:
        self.backend = UserspaceBackend(esp_sa_path=esp_sa_path)
        self.sockets: dict[int, socket.socket] = {}

    def udp(self, port: int) -> socket.socket:
        if port not in self.sockets:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", port))
            self.sockets[port] = s
        return self.sockets[port]

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op, b = req["op"], self.backend
        if op == "add_sa":
            b.add_sa(sa_from(req["sa"]))
        elif op == "add_policy":
            b.add_policy(policy_from(req["policy"]))
        elif op == "delete_sa":
            b.delete_sa(req["dst"], req["spi"])
        elif op == "delete_policy":
            b.delete_policy(Selector(**req["selector"]), Direction(req["direction"]))
        elif op == "move_sa":  # same keys/SPI, new addresses
            sel = req.get("selector")
            b.move_sa(req["dst"], req["spi"], req["new_src"], req["new_dst"],
                      Selector(**sel) if sel else None)
        elif op == "replace_sa":  # the same through the generic API: add the copy, drop the old
            old = b.get_sa(req["dst"], req["spi"])
            assert old is not None, "no such SA"
            b.add_sa(old.moved(req["new_src"], req["new_dst"], None))
            b.delete_sa(req["dst"], req["spi"])
        elif op == "get_sa":
            sa = b.get_sa(req["dst"], req["spi"])
            return {"ok": True, "sa": None if sa is None else
                    {"seq": sa.seq, "replay_top": sa.replay_top, "stats": sa.stats}}
        elif op == "counters":
            return {"ok": True, "counters": b.counters()}
        elif op == "bind":
            self.udp(req["port"])
        elif op == "send":
            self.udp(req["sport"]).sendto(req["data"].encode(), (req["dst"], req["dport"]))
        elif op == "recv":
            s = self.udp(req["port"])
            ready, _, _ = select.select([s], [], [], req.get("timeout", 5.0))
            if not ready:
                return {"ok": True, "data": None}
            data, addr = s.recvfrom(65535)
            return {"ok": True, "data": data.decode(), "from": list(addr)}
        elif op == "exit":
            b.close()
            return {"ok": True, "exit": True}
        else:
            raise ValueError(f"unknown op {op!r}")
        return {"ok": True}


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    peer = Peer(sys.argv[1] if len(sys.argv) > 1 else None)
    peer.backend.start()
    close_on_signal(peer.backend)
    print(json.dumps({"ready": True, "tun": peer.backend.tun, "table": peer.backend.table,
                      "mark": peer.backend.mark}), flush=True)
    for line in sys.stdin:
        try:
            answer = peer.handle(json.loads(line))
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
        if answer.get("exit"):
            return
    peer.backend.close()


if __name__ == "__main__":
    main()
