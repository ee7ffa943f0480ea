"""The default smig-lab topology: user A's multi-homed terminal, user B's terminals, servers.

::

        a2 (10.0.1.20)     a1 ── a1-wlan 10.0.1.10      a1-lte 10.0.2.10
            \\            /                \\                  |
          [ wlan  10.0.1.0/24 ]           [ lte  10.0.2.0/24 ]    access networks of user A
                    \\                              /
                     r0 ── 10.0.{0,1,2,3}.1 (IP router) ─┐
                    /                                   \\
          [ netb  10.0.3.0/24 ]                [ core 10.0.0.0/24 ]
           /              \\                   /        |         \\
     b1 (10.0.3.10)   b2 (10.0.3.20)   proxy .10     sms .11    presence .12

`wlan`, `lte`, `netb` and `core` are OVS switches under the lab's Ryu controller (remote).
A1 routes by source address (one routing table per interface), so a socket bound to
10.0.2.10 leaves through `a1-lte` whatever the main table says.

Switch-side ports are named `<switch>-<host>` (e.g. `wlan-a1`, A1's wlan access port) so a
fault can be aimed by name. Per-access-network link parameters (`bw` Mbit/s, `delay`, `jitter`,
`loss` %) go in `links={"wlan": {...}}`; delay/jitter/loss need netem in the kernel.

Plain Mininet loads it too (no kernel OVS datapath on some machines, hence the switch option):

    mn --custom topologies/m2m.py --topo m2m --switch ovs,datapath=user \\
       --controller remote,ip=127.0.0.1,port=6653 --link tc
"""

from __future__ import annotations

import logging
from typing import Any

from mininet.node import Host, Node
from mininet.topo import Topo

# mininet.log makes every logger created after it a MininetLogger (its own handler, no
# propagation): give later loggers (ours) the standard class back.
logging.setLoggerClass(logging.Logger)

# `mn --custom` copies every global of this file into its own globals: keep names prefixed.
# name -> (subnet prefix, dpid); the router is .1 on each.
M2M_NETWORKS: dict[str, tuple[str, int]] = {
    "core": ("10.0.0", 4),
    "wlan": ("10.0.1", 1),
    "lte": ("10.0.2", 2),
    "netb": ("10.0.3", 3),
}
ACCESS_NETWORKS = ("wlan", "lte", "netb")

# host -> [(network, host number)], first entry is the primary interface.
M2M_HOSTS: dict[str, list[tuple[str, int]]] = {
    "a1": [("wlan", 10), ("lte", 10)],
    "a2": [("wlan", 20)],
    "b1": [("netb", 10)],
    "b2": [("netb", 20)],
    "proxy": [("core", 10)],
    "sms": [("core", 11)],
    "presence": [("core", 12)],
}


def address(host: str, network: str) -> str:
    """The IPv4 address `host` has on `network` (without prefix length)."""
    for net, num in M2M_HOSTS[host]:
        if net == network:
            return f"{M2M_NETWORKS[net][0]}.{num}"
    raise KeyError(f"host {host!r} has no interface on {network!r}")


def intf_name(host: str, network: str) -> str:
    return f"{host}-{network}"


def _no_tx_offload(node: Node) -> None:
    """Checksum offload on veths leaves UDP checksums unfinished; the OVS userspace datapath
    forwards them as they are and receivers drop them. Checksum in software instead."""
    for intf in node.intfNames():
        if intf != "lo":
            node.cmd(f"ethtool -K {intf} tx off >/dev/null 2>&1")


class LabHost(Host):
    """A host that routes by source address: one table per interface, so a multi-homed
    terminal can pin a socket to an access network by binding its address."""

    def config(self, gateways: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
        result = super().config(**params)
        _no_tx_offload(self)
        gateways = gateways or {}
        for table, (intf, gw) in enumerate(sorted(gateways.items()), start=100):
            ip = self.intf(intf).IP()
            subnet = gw.rsplit(".", 1)[0] + ".0/24"
            self.cmd(f"ip route add {subnet} dev {intf} src {ip} table {table}")
            self.cmd(f"ip route add default via {gw} dev {intf} table {table}")
            # After the IPsec engines' fwmark rules (priority 100): those must win.
            self.cmd(f"ip rule add from {ip} table {table} priority {1000 + table}")
        primary = next(iter(gateways), None)
        if primary is not None:
            self.cmd(f"ip route replace default via {gateways[primary]} dev {primary}")
        # Media-timeout detection wants a lost path to stay lost, not fall back silently.
        self.cmd("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0")
        return result


class Router(Node):
    """An IPv4 router (Mininet's linuxrouter example): forwarding on, nothing else."""

    def config(self, **params: Any) -> dict[str, Any]:
        result = super().config(**params)
        _no_tx_offload(self)
        self.cmd("sysctl -qw net.ipv4.ip_forward=1")
        return result

    def terminate(self) -> None:
        self.cmd("sysctl -qw net.ipv4.ip_forward=0")
        super().terminate()


class M2MTopo(Topo):
    """User A (a1 on wlan+lte, a2), user B (b1, b2), proxy/sms/presence, router r0."""

    def build(self, links: dict[str, dict[str, Any]] | None = None) -> None:  # type: ignore[override]
        links = links or {}
        for net, (_, dpid) in M2M_NETWORKS.items():
            self.addSwitch(net, dpid=f"{dpid:016x}", failMode="secure")
        first_net = next(iter(M2M_NETWORKS))
        self.addHost("r0", cls=Router, ip=f"{M2M_NETWORKS[first_net][0]}.1/24")
        for net, (prefix, _) in M2M_NETWORKS.items():
            self.addLink(
                "r0", net,
                intfName1=intf_name("r0", net), intfName2=f"{net}-r0",
                params1={"ip": f"{prefix}.1/24"},
            )
        for host, ifaces in M2M_HOSTS.items():
            primary = ifaces[0][0]
            gateways = {intf_name(host, n): f"{M2M_NETWORKS[n][0]}.1" for n, _ in ifaces}
            self.addHost(host, cls=LabHost, ip=f"{address(host, primary)}/24", gateways=gateways)
            for net, _ in ifaces:
                self.addLink(
                    host, net,
                    intfName1=intf_name(host, net), intfName2=f"{net}-{host}",
                    params1={"ip": f"{address(host, net)}/24", **links.get(net, {})},
                    params2=dict(links.get(net, {})),
                )


topos = {"m2m": M2MTopo}
