"""Proxy and terminals as real processes in Mininet hosts (open mode).

Config for this module: alice (a1), bob (b1, b2), carol (a2); only alice and bob are friends.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from experiments.control import NodeControl, NodeError
from experiments.lab import PROJECT, Lab, python, read_jsonl, wait_until
from topologies.m2m import address

pytestmark = pytest.mark.lab

CONFIG = {
    "domain": "m2m.example",
    "users": {"alice": {"terminals": {"a1": ["audio"]}},
              "bob": {"terminals": {"b1": ["audio"], "b2": ["audio", "video"]}},
              "carol": {"terminals": {"a2": ["audio", "video"]}}},
    "friends": [["alice", "bob"]],
    "servers": {"proxy": "10.0.0.10", "sms": "10.0.0.11", "presence": "10.0.0.12"},
}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(name="test-sip") as lab:
        assert lab.run_dir is not None
        config = lab.run_dir / "lab.json"
        config.write_text(json.dumps(CONFIG))
        lab.start_proxy(mode="open", config=config)
        for name in ("a1", "b1", "b2"):
            lab.start_terminal(name, mode="open", config=config)
        yield lab


def node(lab: Lab, name: str) -> NodeControl:
    return lab.nodes[name]


def test_register_call_bye_and_message(lab: Lab) -> None:
    a1, b1 = node(lab, "a1"), node(lab, "b1")
    assert a1("register")["status"] == 200
    assert b1("register")["status"] == 200
    regs = node(lab, "proxy")("status")["registrations"]
    assert regs["sip:a1@m2m.example"][0]["source"] == [address("a1", "wlan"), 5060]
    call = a1("call", to="b1")
    assert call["status"] == 200
    call_id = call["call_id"]
    assert a1("status")["calls"][call_id]["state"] == "Confirmed"
    wait_until(lambda: call_id in b1("status")["calls"], 10, "b1's confirmed dialog")
    assert a1("hangup", call_id=call_id)["status"] == 200
    wait_until(lambda: call_id not in b1("status")["calls"], 10, "b1 to see the BYE")
    assert a1("message", to="b1", text="hello from a1")["status"] == 200
    assert b1("status")["messages"][-1] == {"from": "sip:a1@m2m.example",
                                             "text": "hello from a1",
                                             "call_id": b1("status")["messages"][-1]["call_id"]}
    # The wire agrees: the INVITE went a1 -> proxy -> b1, on UDP 5060 both legs.
    assert lab.run_dir is not None
    events = [e["event"] for e in read_jsonl(lab.run_dir / "events" / "b1.jsonl")]
    assert events.index("incoming-call") < events.index("call-ended")


def test_unregistered_source_gets_no_answer(lab: Lab) -> None:
    node(lab, "b1")("register")
    before = node(lab, "proxy")("status")["counters"].get("dropped-unregistered", 0)
    with pytest.raises(NodeError, match="no answer"):
        node(lab, "b2")("call", to="b1")  # b2 never registered
    after = node(lab, "proxy")("status")["counters"]["dropped-unregistered"]
    assert after == before + 1
    assert node(lab, "b1")("status")["calls"] == {}


def _sipsend(lab: Lab, host: str, *steps: str, as_: str) -> list[int]:
    out = lab.host(host).cmd(
        f"cd {PROJECT} && PYTHONPATH={PROJECT} {python()} tests/lab/sipsend.py "
        f"--local {address(host, 'wlan')} --proxy {address('proxy', 'core')} --as {as_} "
        + " ".join(steps))
    return [r["status"] for r in json.loads(out.strip().splitlines()[-1])]


def test_spoofed_from_and_non_friend_are_403(lab: Lab) -> None:
    node(lab, "b1")("register")
    # a2 (carol) registers, then claims to be b2; then writes to b1 as herself (not a friend).
    statuses = _sipsend(lab, "a2", "REGISTER:a2", "MESSAGE:b1:b2", "MESSAGE:b1", "INVITE:b1",
                        as_="a2")
    assert statuses == [200, 403, 403, 403]
    counters = node(lab, "proxy")("status")["counters"]
    assert counters["forbidden-from"] >= 1 and counters["forbidden-policy"] >= 2


def test_bad_control_commands_get_error_replies(lab: Lab) -> None:
    a1 = node(lab, "a1")
    assert a1.raw(b"{oops")["error"].startswith("request is not valid JSON")
    with pytest.raises(NodeError, match="unknown command 'dance'"):
        a1("dance")
    with pytest.raises(NodeError, match="call: missing parameter"):
        a1("call")
    with pytest.raises(NodeError, match="unknown terminal 'zz'"):
        a1("call", to="zz")
    with pytest.raises(NodeError, match="no call 'nope'"):
        a1("hangup", call_id="nope")
    with pytest.raises(NodeError, match="expires must be 0..86400"):
        a1("register", expires=-5)
    assert a1("status")["name"] == "a1"  # still serving


def test_lab_cli_drives_nodes_and_faults(lab: Lab, tmp_path: Path) -> None:
    """`make lab`'s commands, as a script: a node command, a bad one, a fault and back."""
    from experiments.labcli import LabCLI

    script = tmp_path / "cmds"
    script.write_text("node a1 register\nnode b1 register\n"
                      "node a1 message to=b1 text=from-the-cli\n"
                      "node a1 call to=5\nnode zz status\nnodes\n"
                      "fault wlan wlan-a1 blackhole\nfault list\nfault restore\nfault melt\n"
                      "node a1 message to=b1 to=b2 text=x\n")
    out = io.StringIO()
    with open(os.devnull) as stdin:  # Mininet polls its stdin, even in batch mode
        LabCLI(lab, stdin=stdin, script=str(script), stdout=out)
    text = out.getvalue()
    assert '"status": 200' in text
    assert node(lab, "b1")("status")["messages"][-1]["text"] == "from-the-cli"
    assert "error: call: parameter 'to' must be str, got int" in text
    assert "no node 'zz'" in text and "proxy" in text
    assert '"kind": "blackhole"' in text
    assert "restored 1 fault(s): #" in text and "blackhole on wlan/wlan-a1" in text
    assert "error: to given twice" in text
    assert "usage: fault SWITCH PORT" in text
    assert lab.faults is not None and lab.faults.faults() == []
