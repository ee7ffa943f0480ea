"""Start `ryu-manager` on Python 3.11 (DESIGN §4).

Ryu 4.34 imports `eventlet.wsgi.ALREADY_HANDLED`, which eventlet 0.33 no longer defines; set it
before Ryu is imported, then hand over to Ryu's own entry point. Usage is ryu-manager's:

    python -m nodes.ryu_launcher --ofp-tcp-listen-port 6653 --wsapi-port 8080 nodes/controller.py

One difference: the REST API (fault injection, unauthenticated) listens on 127.0.0.1 unless
`--wsapi-host` says otherwise; ryu-manager's own default is every interface (0.0.0.0).
"""

from __future__ import annotations

import sys

import eventlet.wsgi

if not hasattr(eventlet.wsgi, "ALREADY_HANDLED"):
    eventlet.wsgi.ALREADY_HANDLED = object()

DEFAULT_WSAPI_HOST = "127.0.0.1"


def ryu_args(argv: list[str]) -> list[str]:
    """ryu-manager's arguments: `argv`, with --wsapi-host 127.0.0.1 unless it names one."""
    if any(a == "--wsapi-host" or a.startswith("--wsapi-host=") for a in argv):
        return list(argv)
    return ["--wsapi-host", DEFAULT_WSAPI_HOST, *argv]


def main() -> None:
    from ryu.cmd import manager  # imported late on purpose: after the patch above

    manager.main(args=ryu_args(sys.argv[1:]), prog="ryu-manager")


if __name__ == "__main__":
    main()
