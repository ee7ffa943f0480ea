"""What a lab run may leave behind on the machine: snapshot before, compare after."""

from __future__ import annotations

import subprocess

# Host shells, the controller, and whatever writes into a run folder (captures, node logs).
LAB_PROCESS_MARKERS = ("mininet:", "nodes.ryu_launcher", "/captures/")


def _lines(*cmd: str) -> set[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def snapshot() -> dict[str, set[str]]:
    links = {line.split(":")[1].strip().split("@")[0] for line in _lines("ip", "-o", "link")}
    procs = {
        line
        for line in _lines("ps", "-eo", "pid=,args=")
        if any(m in line for m in LAB_PROCESS_MARKERS) and "pytest" not in line
    }
    return {
        # Mininet's hosts are unnamed namespaces (gone with their processes); anything named
        # the lab or its probes create starts with "smig".
        "netns": {n for n in _lines("ip", "netns", "list") if n.startswith("smig")},
        "links": links,
        "bridges": _lines("ovs-vsctl", "--timeout=5", "list-br"),
        "processes": procs,
        "xfrm": _lines("ip", "xfrm", "state"),
    }


def new_since(before: dict[str, set[str]]) -> dict[str, set[str]]:
    """What exists now and did not before (empty dict = nothing left behind)."""
    now = snapshot()
    return {k: now[k] - before[k] for k in now if now[k] - before[k]}
