"""`make lab`: Mininet's CLI over the running lab, with commands for its nodes and faults.

    mininet> node a1 call to=b1                 # a node's control command, JSON reply
    mininet> node a1 link_switch via=a1-lte
    mininet> node a1 help
    mininet> nodes                              # each node: registrations, calls, sessions
    mininet> fault wlan wlan-a1 down            # or blackhole
    mininet> fault list
    mininet> fault restore                      # all; or `fault restore ID`
    mininet> a1 ping -c 3 10.0.3.10             # Mininet's own commands work as ever

Everything runs with the lab's own clients (experiments.control, experiments.faults).
"""

from __future__ import annotations

import json
from typing import Any

from mininet.cli import CLI

from experiments.control import NodeError, parse_params
from experiments.faults import ControllerError
from experiments.lab import TERMINALS, Lab

BANNER = """
The lab is up: proxy, sms, presence and the terminals a1 a2 b1 b2 run and are registered.
  node a1 call to=b1          node a1 status          node a1 help       nodes
  node a1 link_switch via=a1-lte                       node a1 switch call_id=ID to=a2
  fault wlan wlan-a1 down     fault list              fault restore
Mininet's commands work as ever (a1 ping -c 3 10.0.3.10, pingall, ...). Run folder: {run}
"""


class LabCLI(CLI):  # type: ignore[misc]
    prompt = "smig-lab> "

    def __init__(self, lab: Lab, **kwargs: Any) -> None:
        self.lab = lab
        super().__init__(lab.net, **kwargs)

    def run(self) -> None:
        """Ctrl-C at the prompt only interrupts the command (as in Mininet); SIGTERM or a
        closed terminal (experiments.console: KeyboardInterrupt with the signal's name) ends
        the CLI, and the lab's teardown runs."""
        while True:
            try:
                self.cmdloop()
                return
            except KeyboardInterrupt as exc:
                if exc.args:
                    raise
                self.stdout.write("\nInterrupt\n")

    def _out(self, value: Any) -> None:
        self.stdout.write(json.dumps(value, indent=2) + "\n")

    def do_node(self, line: str) -> None:
        """node NAME CMD [key=value ...]: a command to a node's control socket."""
        words = line.split()
        if len(words) < 2:
            self.stdout.write(f"usage: node NAME CMD [key=value ...]; nodes: "
                              f"{' '.join(self.lab.nodes)}\n")
            return
        name, cmd, rest = words[0], words[1], words[2:]
        node = self.lab.nodes.get(name)
        if node is None:
            self.stdout.write(f"no node {name!r}; nodes: {' '.join(self.lab.nodes)}\n")
            return
        try:
            self._out(node(cmd, **parse_params(rest)))
        except (ValueError, NodeError, OSError) as exc:
            self.stdout.write(f"error: {exc}\n")

    def do_nodes(self, _line: str) -> None:
        """nodes: each node's state in one line."""
        for name, node in self.lab.nodes.items():
            try:
                st = node("status")
            except (NodeError, OSError) as exc:
                self.stdout.write(f"{name:9} error: {exc}\n")
                continue
            parts = [f"{k}={len(st[k])}" for k in ("registrations", "calls", "sessions",
                                                   "registered", "addresses")
                     if isinstance(st.get(k), dict)]
            if "active" in st:
                parts.insert(0, f"on {st['active']}" + ("" if st.get("registered")
                                                        else " (not registered)"))
            self.stdout.write(f"{name:9} {' '.join(parts)}\n")

    def do_fault(self, line: str) -> None:
        """fault SWITCH PORT down|blackhole | fault list | fault restore [ID]"""
        words = line.split()
        faults = self.lab.faults
        assert faults is not None
        try:
            if words == ["list"]:
                self._out(faults.faults())
            elif words[:1] == ["restore"] and len(words) <= 2:
                done = [faults.restore(int(words[1]))] if len(words) == 2 else \
                    faults.restore_all()
                what = ", ".join(f"#{f['id']} {f['kind']} on {f['switch']}/{f['port']}"
                                 for f in done)
                self.stdout.write(f"restored {len(done)} fault(s){': ' + what if what else ''}\n")
            elif len(words) == 3:
                self._out(faults.inject(*words))
            else:
                self.stdout.write("usage: fault SWITCH PORT down|blackhole | fault list | "
                                  "fault restore [ID]\n")
        except (ValueError, ControllerError, OSError) as exc:
            self.stdout.write(f"error: {exc}\n")


def run(lab: Lab) -> None:
    """Servers and terminals up and registered, then the CLI until `exit`."""
    lab.start_servers()
    for name in TERMINALS:
        lab.start_terminal(name)
        lab.nodes[name]("register")
    assert lab.run_dir is not None
    print(BANNER.format(run=lab.run_dir))
    LabCLI(lab)
