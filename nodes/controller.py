"""Ryu controller app of the lab: L2 forwarding on the access switches plus fault injection.

Runs in the root namespace under `python -m nodes.ryu_launcher nodes/controller.py`.
REST API (JSON; errors are 4xx with {"error": "..."}):

    GET    /lab/switches           connected switches and their ports
    GET    /lab/faults             faults now active
    POST   /lab/faults             {"switch": "wlan", "port": "wlan-a1" | 2,
                                    "kind": "down" | "blackhole"}
    DELETE /lab/faults/<id>        restore one fault
    DELETE /lab/faults             restore every fault

Bad requests are 4xx with a JSON {"error": ...} (a body that is not a JSON object with
exactly those fields, an id that is no fault's; unknown paths 404, other methods 405); a
bug is a JSON 500 with the traceback in the controller's log only. A switch that
disconnects (its bridge deleted) leaves /lab/switches, and its faults are dropped.

*down* is an OpenFlow port-mod (OFPPC_PORT_DOWN): the host's interface loses carrier.
*blackhole* is a set of high-priority drop flows (traffic from the port, and to every MAC
learned behind it) with the port left out of floods: the carrier stays up, like a radio fade.
Every injection and restore is logged, and appended as a JSON line with a wall-clock `t_ns`
(the time of that event: `fault-restored` carries the injection time as `injected_t_ns`)
to the file named by $SMIG_CONTROLLER_EVENTS (DESIGN §2, Measurements).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ryu.app.wsgi import ControllerBase, Response, WSGIApplication, route
from ryu.base import app_manager
from ryu.controller import ofp_event
from ryu.controller.handler import (
    CONFIG_DISPATCHER,
    DEAD_DISPATCHER,
    MAIN_DISPATCHER,
    set_ev_cls,
)
from ryu.lib.packet import ethernet, packet
from ryu.ofproto import ofproto_v1_3

from nodes.jsonin import loads

APP_KEY = "smig_lab_controller"
FAULT_KINDS = ("down", "blackhole")
PRIO_FORWARD = 10
PRIO_BLACKHOLE = 60000
FAULT_COOKIE_BASE = 0x5E1F0000
FAULT_FIELDS = ("switch", "port", "kind")
MAX_ID_DIGITS = 18  # fault ids count up from 1; a longer number is nobody's id
ROUTES = {"/lab/switches": ("GET",), "/lab/faults": ("GET", "POST", "DELETE")}


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
        kwargs["wsgi"].register(FallbackApi, {APP_KEY: self})  # after: matched last

    # -- events log -------------------------------------------------------------------------
    def _event(self, event: str, **fields: Any) -> None:
        """One event line; its `t_ns` is now unless `fields` give the event's own time."""
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

    @set_ev_cls(ofp_event.EventOFPStateChange, DEAD_DISPATCHER)
    def _disconnected(self, ev: Any) -> None:
        """A switch went away (its bridge deleted, OVS stopped): it leaves the switch list and
        its faults go with it (nothing is left on the switch to restore)."""
        dp = ev.datapath
        sw = self.switches.get(dp.id) if dp is not None and dp.id is not None else None
        if sw is None or sw.datapath is not dp:  # unknown, or already replaced by a reconnect
            return
        del self.switches[dp.id]
        for fault in [f for f in self.faults.values() if f.switch == sw.name]:
            del self.faults[fault.id]
            self._event("fault-dropped", **_fault_fields(fault), reason="switch disconnected")
        self._event("switch-disconnected", switch=sw.name, dpid=sw.dpid)

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
            if sw.name and sw.name == name:  # nameless until its port description arrives
                return sw
        raise FaultError(404, f"unknown switch {name!r}")

    def inject(self, switch: str, port_ref: str | int, kind: str) -> Fault:
        if kind not in FAULT_KINDS:
            raise FaultError(400, f"unknown fault kind {kind!r} (expected "
                                  f"{' or '.join(FAULT_KINDS)})")
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
        self._event("fault-restored", **_fault_fields(fault))
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


def _fault_fields(fault: Fault) -> dict[str, Any]:
    """A fault's record for a later event: the injection time under its own name, so the
    event's `t_ns` is the event's time."""
    fields = asdict(fault)
    fields["injected_t_ns"] = fields.pop("t_ns")
    return fields


def _json(status: int, body: dict[str, Any], headers: list[tuple[str, str]] | None = None
          ) -> Response:
    resp = Response(
        status=status, content_type="application/json", charset="utf-8", body=json.dumps(body)
    )
    for name, value in headers or []:
        resp.headers[name] = value
    return resp


def _path(req: Any) -> str:
    """The request path for messages: WSGI hands it over as Latin-1 text; webob's
    `req.path` raises on one that is not UTF-8 (like /lab/faults/%B2)."""
    raw = req.environ.get("PATH_INFO", "")
    return raw.encode("latin-1", "replace").decode("utf-8", "replace")


def _guarded(handler: Callable[..., Response]) -> Callable[..., Response]:
    """A handler that raises answers a JSON 500; the traceback goes to the log only."""

    @functools.wraps(handler)
    def wrapper(self: RestBase, req: Any, **kwargs: Any) -> Response:
        try:
            return handler(self, req, **kwargs)
        except Exception as exc:
            self.app.logger.exception("REST %s %s failed", req.method, _path(req)[:100])
            return _json(500, {"error": f"internal error: {type(exc).__name__}"})

    return wrapper


class RestBase(ControllerBase):
    def __init__(self, req: Any, link: Any, data: dict[str, Any], **config: Any) -> None:
        super().__init__(req, link, data, **config)
        self.app: LabController = data[APP_KEY]

    def _error(self, status: int, message: str,
               headers: list[tuple[str, str]] | None = None) -> Response:
        self.app.logger.warning("REST %s %s -> %d: %s", self.req.method,
                                _path(self.req)[:100], status, message)
        return _json(status, {"error": message}, headers)


class FaultApi(RestBase):
    @route("lab", "/lab/switches", methods=["GET"])
    @_guarded
    def switches(self, req: Any, **_: Any) -> Response:
        return _json(200, {"switches": self.app.describe()})

    @route("lab", "/lab/faults", methods=["GET"])
    @_guarded
    def list_faults(self, req: Any, **_: Any) -> Response:
        return _json(200, {"faults": [asdict(f) for f in self.app.faults.values()]})

    @route("lab", "/lab/faults", methods=["POST"])
    @_guarded
    def inject(self, req: Any, **_: Any) -> Response:
        try:
            body = loads(req.body or b"", "body")
        except ValueError as exc:
            return self._error(400, str(exc))
        if not isinstance(body, dict):
            return self._error(400, "body must be a JSON object")
        missing = [k for k in FAULT_FIELDS if k not in body]
        if missing:
            return self._error(400, f"missing field(s): {', '.join(missing)}")
        unknown = sorted(set(body) - set(FAULT_FIELDS))
        if unknown:
            return self._error(400, f"unknown field(s): {', '.join(repr(k)[:40] for k in unknown)}"
                               f" (expected {', '.join(FAULT_FIELDS)})")
        switch, port, kind = body["switch"], body["port"], body["kind"]
        if not isinstance(switch, str) or not switch or not isinstance(kind, str):
            return self._error(400, "'switch' must be a switch name and 'kind' a string")
        if isinstance(port, bool) or not isinstance(port, str | int):
            return self._error(400, "'port' must be a port name or number")
        try:
            fault = self.app.inject(switch, port, kind)
        except FaultError as exc:
            return self._error(exc.status, str(exc))
        return _json(201, {"fault": asdict(fault)})

    @route("lab", "/lab/faults/{fault_id}", methods=["DELETE"])
    @_guarded
    def restore(self, req: Any, fault_id: str, **_: Any) -> Response:
        # isdigit() alone takes '²' and other Unicode digits that int() refuses.
        if not (fault_id.isascii() and fault_id.isdigit()):
            shown = fault_id.encode("latin-1", "replace").decode("utf-8", "replace")
            return self._error(400, f"fault id must be a number, got {shown[:40]!r}")
        if len(fault_id) > MAX_ID_DIGITS:
            return self._error(404, f"no active fault {fault_id[:MAX_ID_DIGITS]}...")
        try:
            fault = self.app.restore(int(fault_id))
        except FaultError as exc:
            return self._error(exc.status, str(exc))
        return _json(200, {"restored": asdict(fault)})

    @route("lab", "/lab/faults", methods=["DELETE"])
    @_guarded
    def restore_all(self, req: Any, **_: Any) -> Response:
        restored, failed = [], []
        for fid in list(self.app.faults):
            try:
                restored.append(asdict(self.app.restore(fid)))
            except FaultError as exc:
                failed.append(f"{fid}: {exc}")
        if failed:
            return self._error(409, f"could not restore {'; '.join(failed)}")
        return _json(200, {"restored": restored})


class FallbackApi(RestBase):
    """Registered after FaultApi, so it sees only what no route of it matched: 405 for a
    known path with another method, 404 for the rest; JSON like every other answer."""

    @route("lab-fallback", "/{path:.*}")
    @_guarded
    def fallback(self, req: Any, **_: Any) -> Response:
        path = _path(req)
        fault_id = path.removeprefix("/lab/faults/") if path.startswith("/lab/faults/") else ""
        allowed = ("DELETE",) if fault_id and "/" not in fault_id else ROUTES.get(path)
        if allowed is not None and req.method not in allowed:
            return self._error(405, f"{req.method} is not allowed on {path} "
                               f"(allowed: {', '.join(allowed)})",
                               [("Allow", ", ".join(allowed))])
        return self._error(404, f"no such resource {path[:80]!r} (the API is under /lab/: "
                           "switches, faults)")
