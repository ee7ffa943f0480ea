"""The command-line options every node program shares, and its logging set-up."""

from __future__ import annotations

import argparse
import logging


def node_arguments(parser: argparse.ArgumentParser, *, credentials: bool = False,
                   trust: bool = False) -> None:
    """--config, --mode, --ipsec, --esp-sa, --events, --control, --t1, --log-level; with
    `credentials` the terminals' PSK file, with `trust` the servers' domain key."""
    parser.add_argument("--config", default="config/lab.json", help="users, terminals, servers")
    parser.add_argument("--mode", choices=("open", "ipsec-m2ms"), default="ipsec-m2ms",
                        help="open: no sec-agree (SIPp interop, benchmark), same code path")
    if credentials:
        parser.add_argument("--credentials", default="config/credentials.json",
                            help="per-terminal PSKs (ipsec-m2ms mode)")
    if trust:
        parser.add_argument("--trust", default="config/trust.json",
                            help="the servers' domain key for their static SAs")
    parser.add_argument("--ipsec", choices=("kernel", "userspace"), default="userspace",
                        help="IPsec backend (the runner passes the probe's choice)")
    parser.add_argument("--esp-sa", help="append installed SAs to this Wireshark esp_sa file")
    parser.add_argument("--events", help="JSON-lines event log (default stdout)")
    parser.add_argument("--control", help="Unix socket path for the control interface")
    parser.add_argument("--t1", type=float, default=0.5, help="SIP T1 in seconds")
    parser.add_argument("--log-level", default="WARNING")


def start_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# Young-generation threshold for a busy signalling server (CPython's default is 700).
SERVER_GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc_for_server() -> None:
    """Garbage-collector settings for a node that handles many requests a second (the
    proxy): the objects made at start-up are frozen out of every later collection, and the
    collector runs after 50,000 net allocations instead of 700. Finished transactions
    are freed by reference counting alone (they hold no cycles), so the collector only
    finds the rare cycle; at the default it spent a third of the proxy's time under a call
    load (`make bench`), rescanning the transactions alive for 64*T1."""
    import gc

    gc.freeze()
    gc.set_threshold(*SERVER_GC_THRESHOLDS)
