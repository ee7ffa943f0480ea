"""Start `ryu-manager` on Python 3.11 (DESIGN §4).

Ryu 4.34 imports `eventlet.wsgi.ALREADY_HANDLED`, which eventlet 0.33 no longer defines; set it
before Ryu is imported, then hand over to Ryu's own entry point. Usage is ryu-manager's:

    python -m nodes.ryu_launcher --ofp-tcp-listen-port 6653 --wsapi-port 8080 nodes/controller.py
"""

from __future__ import annotations

import sys

import eventlet.wsgi

if not hasattr(eventlet.wsgi, "ALREADY_HANDLED"):
    eventlet.wsgi.ALREADY_HANDLED = object()


def main() -> None:
    from ryu.cmd import manager  # imported late on purpose: after the patch above

    manager.main(args=sys.argv[1:], prog="ryu-manager")


if __name__ == "__main__":
    main()
