"""Ryu controller app of the lab: L2 forwarding on the access switches plus fault injection.

Runs in the root namespace under `python -m nodes.ryu_launcher nodes/controller.py`.
REST API (JSON; errors are 4xx with {"error": "..."}):

    GET    /lab/switches           connected switches and their ports
    GET    /lab/faults             faults now active
    POST   /lab/faults             {"switch": "wlan", "port": "wlan-a1" | 2,
                                    "kind": "down" | "blackhole"}
    DELETE /lab/faults/<id>        restore one fault
    DELETE /lab/faults             restore every fault

*down* is an OpenFlow port-mod (OFPPC_PORT_DOWN): the host's interface loses carrier.
*blackhole* is a set of high-priority drop flows (traffic from the port, and to every MAC
learned behind it) with the port left out of floods: the carrier stays up, like a radio fade.
Every injection and restore is logged, and appended as a JSON line with a wall-clock `t_ns`
to the file named by $SMIG_CONTROLLER_EVENTS (DESIGN §2, Measurements).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ryu.app.wsgi import ControllerBase, Response, WSGIApplication, route
from ryu.base import app_manager
from ryu.controller import ofp_event
from ryu.controller.handler import CONFIG_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
from ryu.lib.packet import ethernet, packet
from ryu.ofproto import ofproto_v1_3

APP_KEY = "smig_lab_controller"
FAULT_KINDS = ("down", "blackhole")
PRIO_FORWARD = 10
PRIO_BLACKHOLE = 60000
FAULT_COOKIE_BASE = 0x5E1F0000


@dataclass
class Port:
    no: int
    name: str
    hw_addr: str
    down: bool = False  # administratively down (our port-mod) or no carrier


@dataclass
class Switch:
    dpid: int
    datapath: Any
    name: str = ""
    ports: dict[int, Port] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)  # learned MAC -> port number

    def find_port(self, ref: str | int) -> Port | None:
        if isinstance(ref, int):
            return self.ports.get(ref)
        for port in self.ports.values():
            if port.name == ref:
                return port
        return None


@dataclass
class Fault:
    id: int
    switch: str
    port: str
    port_no: int
    kind: str
    t_ns: int


class FaultError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LabController(app_manager.RyuApp):
    OFP_VERSIONS: ClassVar[list[int]] = [ofproto_v1_3.OFP_VERSION]
    _CONTEXTS: ClassVar[dict[str, type]] = {"wsgi": WSGIApplication}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.switches: dict[int, Switch] = {}
        self.faults: dict[int, Fault] = {}
        self._ids = itertools.count(1)
        self._events_path = os.environ.get("SMIG_CONTROLLER_EVENTS")
        kwargs["wsgi"].register(FaultApi, {APP_KEY: self})

    # -- events log -------------------------------------------------------------------------
    def _event(self, event: str, **fields: Any) -> None:
        record = {"t_ns": time.time_ns(), "node": "controller", "event": event, **fields}
        self.logger.info("%s %s", event, json.dumps(fields, sort_keys=True))
        if self._events_path:
            with open(self._events_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- OpenFlow: switch set-up and L2 learning -----------------------------------------------
    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _features(self, ev: Any) -> None:
        dp = ev.msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        self.switches[dp.id] = Switch(dp.id, dp)
        miss = parser.OFPMatch()
        actions = [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)]
        self._add_flow(dp, 0, miss, actions)
        dp.send_msg(parser.OFPPortDescStatsRequest(dp, 0))

    @set_ev_cls(ofp_event.EventOFPPortDescStatsReply, MAIN_DISPATCHER)
    def _port_desc(self, ev: Any) -> None:
        sw = self.switches.get(ev.msg.datapath.id)
        if sw is None:
            return
        ofp = ev.msg.datapath.ofproto
        for p in ev.msg.body:
            name = p.name.decode() if isinstance(p.name, bytes) else p.name
            if p.port_no == ofp.OFPP_LOCAL:
                sw.name = name
                continue
            down = bool(p.config & ofp.OFPPC_PORT_DOWN or p.state & ofp.OFPPS_LINK_DOWN)
            sw.ports[p.port_no] = Port(p.port_no, name, p.hw_addr, down)
        self._event("switch-connected", switch=sw.name, dpid=sw.dpid, ports=len(sw.ports))

    @set_ev_cls(ofp_event.EventOFPPortStatus, MAIN_DISPATCHER)
    def _port_status(self, ev: Any) -> None:
        sw = self.switches.get(ev.msg.datapath.id)
        if sw is None:
            return
        ofp = ev.msg.datapath.ofproto
        p = ev.msg.desc
        if p.port_no == ofp.OFPP_LOCAL:
            return
        if ev.msg.reason == ofp.OFPPR_DELETE:
            sw.ports.pop(p.port_no, None)
            return
        name = p.name.decode() if isinstance(p.name, bytes) else p.name
        down = bool(p.config & ofp.OFPPC_PORT_DOWN or p.state & ofp.OFPPS_LINK_DOWN)
        sw.ports[p.port_no] = Port(p.port_no, name, p.hw_addr, down)

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev: Any) -> None:
        msg = ev.msg
        dp = msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        sw = self.switches.get(dp.id)
        if sw is None:
            return
        in_port = msg.match["in_port"]
        if self._blackholed(sw, in_port):
            return  # a fade swallows traffic from the port too, even before the flow lands
        eth = packet.Packet(msg.data).get_protocol(ethernet.ethernet)
        if eth is None:
            return
        sw.macs[eth.src] = in_port
        out_port = sw.macs.get(eth.dst)
        if out_port is not None and self._blackholed(sw, out_port):
            return
        if out_port is None:
            actions = [
                parser.OFPActionOutput(no)
                for no in sw.ports
                if no != in_port and not self._blackholed(sw, no)
            ]
        else:
            actions = [parser.OFPActionOutput(out_port)]
            match = parser.OFPMatch(in_port=in_port, eth_dst=eth.dst)
            self._add_flow(dp, PRIO_FORWARD, match, actions)
        data = msg.data if msg.buffer_id == ofp.OFP_NO_BUFFER else None
        dp.send_msg(
            parser.OFPPacketOut(
                datapath=dp, buffer_id=msg.buffer_id, in_port=in_port, actions=actions, data=data
            )
        )

    def _add_flow(
        self, dp: Any, priority: int, match: Any, actions: list[Any], cookie: int = 0
    ) -> None:
        ofp, parser = dp.ofproto, dp.ofproto_parser
        inst = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)] if actions else []
        dp.send_msg(
            parser.OFPFlowMod(
                datapath=dp, priority=priority, match=match, instructions=inst, cookie=cookie
            )
        )

    def _blackholed(self, sw: Switch, port_no: int) -> bool:
        return any(
            f.kind == "blackhole" and f.switch == sw.name and f.port_no == port_no
            for f in self.faults.values()
        )

    # -- faults ---------------------------------------------------------------------------------
    def switch_by_name(self, name: str) -> Switch:
        for sw in self.switches.values():
            if sw.name == name:
                return sw
        raise FaultError(404, f"unknown switch {name!r}")

    def inject(self, switch: str, port_ref: str | int, kind: str) -> Fault:
        if kind not in FAULT_KINDS:
            raise FaultError(400, f"unknown fault kind {kind!r} (expected one of {FAULT_KINDS})")
        sw = self.switch_by_name(switch)
        port = sw.find_port(port_ref)
        if port is None:
            raise FaultError(404, f"switch {switch!r} has no port {port_ref!r}")
        for f in self.faults.values():
            if f.switch == sw.name and f.port_no == port.no:
                raise FaultError(409, f"port {port.name} already has fault {f.id} ({f.kind})")
        fault = Fault(next(self._ids), sw.name, port.name, port.no, kind, time.time_ns())
        if kind == "down":
            self._port_mod(sw, port, down=True)
        else:
            self._blackhole(sw, port, fault)
        self.faults[fault.id] = fault
        self._event("fault-injected", **asdict(fault))
        return fault

    def restore(self, fault_id: int) -> Fault:
        fault = self.faults.get(fault_id)
        if fault is None:
            raise FaultError(404, f"no active fault {fault_id}")
        sw = self.switch_by_name(fault.switch)
        port = sw.ports.get(fault.port_no)
        if fault.kind == "down" and port is not None:
            self._port_mod(sw, port, down=False)
        elif fault.kind == "blackhole":
            self._delete_cookie(sw, FAULT_COOKIE_BASE + fault.id)
        del self.faults[fault_id]
        self._event("fault-restored", **asdict(fault), restored_t_ns=time.time_ns())
        return fault

    def _port_mod(self, sw: Switch, port: Port, down: bool) -> None:
        dp = sw.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        config = ofp.OFPPC_PORT_DOWN if down else 0
        dp.send_msg(
            parser.OFPPortMod(
                datapath=dp,
                port_no=port.no,
                hw_addr=port.hw_addr,
                config=config,
                mask=ofp.OFPPC_PORT_DOWN,
                advertise=0,
            )
        )
        dp.send_msg(parser.OFPBarrierRequest(dp))

    def _blackhole(self, sw: Switch, port: Port, fault: Fault) -> None:
        dp = sw.datapath
        parser = dp.ofproto_parser
        cookie = FAULT_COOKIE_BASE + fault.id
        self._add_flow(dp, PRIO_BLACKHOLE, parser.OFPMatch(in_port=port.no), [], cookie)
        for mac, no in sw.macs.items():
            if no == port.no:
                self._add_flow(dp, PRIO_BLACKHOLE, parser.OFPMatch(eth_dst=mac), [], cookie)
        dp.send_msg(parser.OFPBarrierRequest(dp))

    def _delete_cookie(self, sw: Switch, cookie: int) -> None:
        dp = sw.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        dp.send_msg(
            parser.OFPFlowMod(
                datapath=dp,
                command=ofp.OFPFC_DELETE,
                cookie=cookie,
                cookie_mask=0xFFFFFFFFFFFFFFFF,
                out_port=ofp.OFPP_ANY,
                out_group=ofp.OFPG_ANY,
                match=parser.OFPMatch(),
            )
        )
        dp.send_msg(parser.OFPBarrierRequest(dp))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": sw.name,
                "dpid": sw.dpid,
                "ports": [
                    {"no": p.no, "name": p.name, "down": p.down}
                    for p in sorted(sw.ports.values(), key=lambda p: p.no)
                ],
            }
            for sw in sorted(self.switches.values(), key=lambda s: s.name)
        ]


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(
        status=status, content_type="application/json", charset="utf-8", body=json.dumps(body)
    )


class FaultApi(ControllerBase):
    def __init__(self, req: Any, link: Any, data: dict[str, Any], **config: Any) -> None:
        super().__init__(req, link, data, **config)
        self.app: LabController = data[APP_KEY]

    @route("lab", "/lab/switches", methods=["GET"])
    def switches(self, req: Any, **_: Any) -> Response:
        return _json(200, {"switches": self.app.describe()})

    @route("lab", "/lab/faults", methods=["GET"])
    def list_faults(self, req: Any, **_: Any) -> Response:
        return _json(200, {"faults": [asdict(f) for f in self.app.faults.values()]})

    @route("lab", "/lab/faults", methods=["POST"])
    def inject(self, req: Any, **_: Any) -> Response:
        try:
            body = json.loads(req.body or b"")
        except (ValueError, UnicodeDecodeError) as exc:
            return self._error(400, f"body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return self._error(400, "body must be a JSON object")
        missing = [k for k in ("switch", "port", "kind") if k not in body]
        if missing:
            return self._error(400, f"missing field(s): {', '.join(missing)}")
        switch, port, kind = body["switch"], body["port"], body["kind"]
        if not isinstance(switch, str) or not isinstance(kind, str):
            return self._error(400, "'switch' and 'kind' must be strings")
        if isinstance(port, bool) or not isinstance(port, str | int):
            return self._error(400, "'port' must be a port name or number")
        try:
            fault = self.app.inject(switch, port, kind)
        except FaultError as exc:
            return self._error(exc.status, str(exc))
        return _json(201, {"fault": asdict(fault)})

    @route("lab", "/lab/faults/{fault_id}", methods=["DELETE"])
    def restore(self, req: Any, fault_id: str, **_: Any) -> Response:
        if not fault_id.isdigit():
            return self._error(400, f"fault id must be a number, got {fault_id!r}")
        try:
            fault = self.app.restore(int(fault_id))
        except FaultError as exc:
            return self._error(exc.status, str(exc))
        return _json(200, {"restored": asdict(fault)})

    @route("lab", "/lab/faults", methods=["DELETE"])
    def restore_all(self, req: Any, **_: Any) -> Response:
        restored = [asdict(self.app.restore(fid)) for fid in list(self.app.faults)]
        return _json(200, {"restored": restored})

    def _error(self, status: int, message: str) -> Response:
        self.app.logger.warning("REST %s %s -> %d: %s", self.req.method, self.req.path, status,
                                message)
        return _json(status, {"error": message})
