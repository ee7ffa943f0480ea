"""The command-line options every node program shares, and its logging set-up.

Every option is checked when it is parsed, so a bad one is a one-line argparse error (exit
code 2), not a traceback later: the validated types below are for the options the node
programs define themselves too (`--listen`, `--local`, `--port`, `--proxy`, ...). What can
only fail once the node starts (a port in use, a socket that cannot be bound) raises
`StartupError`; `run_node()` prints it as one line and exits with code 2 as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import re
import socket
import stat
import sys
from collections.abc import Coroutine, Iterator
from typing import Any

UNIX_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,15}\Z")  # IFNAMSIZ is 16 with the NUL


class StartupError(OSError):
    """A node cannot start (an address that is not local, a port in use, an unusable
    socket or log path): shown as one line, exit code 2. An OSError, so that code which
    catches the OSError it replaces still does."""


# -- validated argparse types ----------------------------------------------------------------
def ipv4(text: str) -> str:
    """A unicast IPv4 address in dotted-quad form (no host names: nothing is resolved)."""
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IPv4 address, got {text!r}") from None
    if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise argparse.ArgumentTypeError(f"{text} is not a unicast address")
    return str(addr)


def local_ipv4(text: str) -> str:
    """An IPv4 address of this host (of this Mininet host's namespace): one to bind to."""
    addr = ipv4(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((addr, 0))
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"{addr} is not an address of this host ({exc.strerror})") from None
    return addr


def port_number(text: str) -> int:
    """A UDP port, 1 to 65535."""
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 1..65535")
    return port


class Seconds:
    """A positive, finite number of seconds, at most `maximum` (argparse type)."""

    def __init__(self, maximum: float = 3600.0) -> None:
        self.maximum = maximum
        self.__name__ = "seconds"  # argparse names the type in its messages

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not math.isfinite(value) or not 0 < value <= self.maximum:
            raise argparse.ArgumentTypeError(
                f"expected seconds greater than 0 and at most {self.maximum:g}, got {text!r}")
        return value


def existing_dir(text: str) -> str:
    """A directory that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no directory {text!r}")
    return text


def interface_address(text: str) -> tuple[str, str]:
    """IFNAME=IPV4: a local interface's name and one of this host's addresses on it."""
    name, sep, ip = text.partition("=")
    if not sep or not _IFNAME_RE.match(name) or name in (".", ".."):
        raise argparse.ArgumentTypeError(f"expected IFNAME=IPV4, got {text!r}")
    return name, local_ipv4(ip)


def control_path_problem(path: str) -> str | None:
    """Why `path` cannot be a control socket, or None if it can."""
    if not path:
        return "empty path"
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        return f"longer than {UNIX_PATH_MAX} bytes (the limit of a Unix socket path)"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"no directory {parent!r}"
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        return "exists and is not a socket"
    return None


def control_socket(text: str) -> str:
    """A Unix socket path the node can bind (an old socket there is replaced)."""
    problem = control_path_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"control socket {text!r}: {problem}")
    return text


def event_log_path(text: str) -> str:
    """A file to append event lines to, in a directory that exists."""
    parent = os.path.dirname(text) or "."
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"event log {text!r}: expected a file name")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"event log {text!r}: no directory {parent!r}")
    return text


def log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"log level {text!r}: expected one of {', '.join(LOG_LEVELS)}")
    return level


# -- the shared options ----------------------------------------------------------------------
def node_arguments(parser: argparse.ArgumentParser, *, credentials: bool = False,
                   trust: bool = False) -> None:
    """--config, --mode, --ipsec, --esp-sa, --events, --control, --t1, --log-level; with
    `credentials` the terminals' PSK file, with `trust` the servers' domain key. A parser
    without a description gets its program's module docstring (`prog` "python -m nodes.sms":
    nodes.sms's), so that --help says what the node is."""
    if parser.description is None:
        doc = _module_doc(parser.prog)
        if doc:
            parser.description = doc
            parser.formatter_class = argparse.RawDescriptionHelpFormatter
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
    parser.add_argument("--esp-sa", type=event_log_path,
                        help="append installed SAs to this Wireshark esp_sa file")
    parser.add_argument("--events", type=event_log_path,
                        help="JSON-lines event log (default stdout)")
    parser.add_argument("--control", type=control_socket,
                        help="Unix socket path for the control interface")
    parser.add_argument("--t1", type=Seconds(maximum=60), default=0.5,
                        help="SIP T1 in seconds (0 < T1 <= 60)")
    parser.add_argument("--log-level", type=log_level, default="WARNING",
                        help=f"one of {', '.join(LOG_LEVELS)} (any case)")


def _module_doc(prog: str) -> str | None:
    """The docstring of the module `prog` ("python -m MODULE") runs, if it is loaded."""
    name = prog.removeprefix("python -m ")
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    module = sys.modules.get(name) or (main if getattr(spec, "name", None) == name else None)
    return getattr(module, "__doc__", None)


def start_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# -- start-up failures -----------------------------------------------------------------------
@contextlib.contextmanager
def starting(what: str) -> Iterator[None]:
    """An OSError inside becomes StartupError("cannot <what>: <reason>")."""
    try:
        yield
    except StartupError:
        raise
    except OSError as exc:
        raise StartupError(f"cannot {what}: {exc.strerror or exc}") from None


def run_node(prog: str, main: Coroutine[Any, Any, int]) -> int:
    """`asyncio.run(main)`; a StartupError is one line on stderr and exit code 2."""
    try:
        return asyncio.run(main)
    except StartupError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


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
