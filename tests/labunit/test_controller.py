"""The lab controller's REST API and switch bookkeeping, in-process: the Ryu app with fake
datapaths behind Ryu's own WSGI application (no OpenFlow, no Mininet)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import nodes.ryu_launcher  # noqa: F401  (before Ryu: its eventlet patch)
from nodes.ryu_launcher import ryu_args

ryu_wsgi = pytest.importorskip("ryu.app.wsgi")
controller = pytest.importorskip("nodes.controller")
from ryu.ofproto import ofproto_v1_3, ofproto_v1_3_parser  # noqa: E402
from webob import Request  # noqa: E402


class FakeDatapath:
    def __init__(self, dpid: int) -> None:
        self.id = dpid
        self.ofproto, self.ofproto_parser = ofproto_v1_3, ofproto_v1_3_parser
        self.sent: list[Any] = []

    def send_msg(self, msg: Any) -> None:
        self.sent.append(msg)


class Lab:
    def __init__(self, events: Path) -> None:
        self.events = events
        self.wsgi = ryu_wsgi.WSGIApplication()
        self.app = controller.LabController(wsgi=self.wsgi)
        self.dps = {}
        for dpid, name in [(1, "wlan"), (2, "lte")]:
            dp = FakeDatapath(dpid)
            self.dps[name] = dp
            self.app.switches[dpid] = controller.Switch(dpid, dp, name, {
                1: controller.Port(1, f"{name}-a1", "00:00:00:00:00:01"),
                2: controller.Port(2, f"{name}-r0", "00:00:00:00:00:02")})

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any, Any]:
        req = Request.blank(path, method=method)
        if body is not None:
            req.body = body
        resp = req.get_response(self.wsgi)
        assert resp.content_type == "application/json", (path, resp.body[:200])
        return resp.status_int, json.loads(resp.body), resp.headers

    def inject(self, switch: str = "wlan", port: str = "wlan-a1", kind: str = "down") -> Any:
        status, body, _ = self.call("POST", "/lab/faults", json.dumps(
            {"switch": switch, "port": port, "kind": kind}).encode())
        return status, body

    def event_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.events.read_text().splitlines()]


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lab:
    events = tmp_path / "controller.jsonl"
    monkeypatch.setenv("SMIG_CONTROLLER_EVENTS", str(events))
    return Lab(events)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("DELETE", "/lab/faults/%B2", None, 400, "fault id must be a number"),  # '²' in WSGI
        ("DELETE", "/lab/faults/%C2%B2", None, 400, "fault id must be a number"),
        ("DELETE", "/lab/faults/%D9%A3", None, 400, "fault id must be a number"),  # Arabic 3
        ("DELETE", "/lab/faults/" + "9" * 5000, None, 404, "no active fault 999"),
        ("DELETE", "/lab/faults/12345", None, 404, "no active fault 12345"),
        ("DELETE", "/lab/faults/", None, 404, "no such resource '/lab/faults/'"),
        ("GET", "/lab/nope", None, 404, "no such resource '/lab/nope'"),
        ("GET", "/", None, 404, "no such resource '/'"),
        ("PUT", "/lab/faults", b"{}", 405, "PUT is not allowed on /lab/faults"),
        ("GET", "/lab/faults/1", None, 405, "GET is not allowed on /lab/faults/1"),
        ("POST", "/lab/switches", b"{}", 405, "POST is not allowed on /lab/switches"),
        ("POST", "/lab/faults", b'{"switch": "wlan", "port": 1, "kind": "down", "x": 1}', 400,
         "unknown field(s): 'x' (expected switch, port, kind)"),
        ("POST", "/lab/faults", b"[" * 1000 + b"]" * 1000, 400,
         "body is not valid JSON: nested deeper than 32 levels"),
        ("POST", "/lab/faults", b'{"switch": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400,
         "body is not valid JSON: nested deeper than 32 levels"),
        ("POST", "/lab/faults", b"\xff\xfe", 400, "body is not valid JSON"),
        ("POST", "/lab/faults", b'{"switch": "", "port": 1, "kind": "down"}', 400,
         "'switch' must be a switch name"),
        ("POST", "/lab/faults", b'{"switch": "wlan", "port": 1.5, "kind": "down"}', 400,
         "'port' must be a port name or number"),
    ],
    ids=["superscript-2", "utf8-superscript-2", "arabic-digit", "5000-digits", "no-such-id",
         "empty-id", "unknown-path", "root", "put", "get-one", "post-switches", "extra-field",
         "nested-1000", "nested-100000", "not-utf8", "empty-switch", "float-port"],
)
def test_bad_requests_are_json_4xx_and_change_nothing(lab: Lab, method: str, path: str,
                                                      body: bytes | None, status: int,
                                                      error: str) -> None:
    got, reply, headers = lab.call(method, path, body)
    assert got == status
    assert error in reply["error"]
    if status == 405:
        assert headers["Allow"]
    assert lab.app.faults == {}
    assert all(dp.sent == [] for dp in lab.dps.values())


def test_a_crashing_handler_is_a_json_500(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(lab.app, "describe", boom)
    status, reply, _ = lab.call("GET", "/lab/switches")
    assert (status, reply) == (500, {"error": "internal error: RuntimeError"})


def test_fault_restored_is_stamped_with_its_own_time(lab: Lab) -> None:
    status, body = lab.inject()
    assert status == 201
    injected = body["fault"]["t_ns"]
    time.sleep(0.01)
    before = time.time_ns()
    status, restored, _ = lab.call("DELETE", f"/lab/faults/{body['fault']['id']}")
    assert status == 200 and restored["restored"]["t_ns"] == injected  # the fault's record
    inj, rest = lab.event_lines()
    assert (inj["event"], inj["t_ns"]) == ("fault-injected", injected)
    assert rest["event"] == "fault-restored"
    assert rest["t_ns"] >= before > injected  # when it was restored
    assert rest["injected_t_ns"] == injected and "restored_t_ns" not in rest
    assert {k: rest[k] for k in ("id", "switch", "port", "kind")} == \
        {"id": 1, "switch": "wlan", "port": "wlan-a1", "kind": "down"}


def test_a_disconnected_switch_leaves_with_its_faults(lab: Lab) -> None:
    assert lab.inject("wlan", "wlan-a1", "blackhole")[0] == 201
    assert lab.inject("lte", "lte-a1", "down")[0] == 201
    lab.app._disconnected(SimpleNamespace(datapath=lab.dps["wlan"]))
    _, switches, _ = lab.call("GET", "/lab/switches")
    assert [s["name"] for s in switches["switches"]] == ["lte"]
    _, faults, _ = lab.call("GET", "/lab/faults")
    assert [f["switch"] for f in faults["faults"]] == ["lte"]
    status, body = lab.inject("wlan", "wlan-a1", "down")  # used to be 201
    assert (status, body["error"]) == (404, "unknown switch 'wlan'")
    status, restored, _ = lab.call("DELETE", "/lab/faults")
    assert status == 200 and [f["switch"] for f in restored["restored"]] == ["lte"]
    events = [(e["event"], e.get("switch")) for e in lab.event_lines()]
    assert ("fault-dropped", "wlan") in events and ("switch-disconnected", "wlan") in events
    # a reconnect replaced the entry: the old datapath's late death changes nothing
    lab.app.switches[2] = controller.Switch(2, FakeDatapath(2), "lte")
    lab.app._disconnected(SimpleNamespace(datapath=lab.dps["lte"]))
    assert 2 in lab.app.switches


def test_nameless_switch_is_not_found_by_an_empty_name(lab: Lab) -> None:
    lab.app.switches[3] = controller.Switch(3, FakeDatapath(3))  # before its port description
    with pytest.raises(controller.FaultError):
        lab.app.switch_by_name("")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nodes/controller.py"], ["--wsapi-host", "127.0.0.1", "nodes/controller.py"]),
        (["--wsapi-host", "0.0.0.0", "x.py"], ["--wsapi-host", "0.0.0.0", "x.py"]),
        (["--wsapi-host=10.0.0.1", "x.py"], ["--wsapi-host=10.0.0.1", "x.py"]),
    ],
)
def test_rest_api_listens_on_loopback_by_default(argv: list[str], expected: list[str]) -> None:
    assert ryu_args(argv) == expected
