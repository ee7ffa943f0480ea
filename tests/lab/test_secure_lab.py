"""Secure signalling (Fig 1) and secure calls (Fig 2) end to end in Mininet, on the IPsec
backend the capability probe selects.

Config for this module: alice (a1), bob (b1, b2), carol (a2); alice and bob are friends.
Misbehaving clients run from host b2 (tests/lab/secattack.py), where no terminal runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from experiments.analysis import rtp_loss
from experiments.control import NodeControl, NodeError
from experiments.lab import DEFAULT_CREDENTIALS, PROJECT, Lab, python, wait_until
from experiments.pcaps import tshark_fields
from nodes.ipsec.esp_sa import tshark_args
from nodes.speech import load_pcm
from tests.lab.test_sip_lab import CONFIG
from topologies.m2m import address

pytestmark = pytest.mark.lab

PROXY = address("proxy", "core")
A1, B1, A2 = address("a1", "wlan"), address("b1", "netb"), address("a2", "wlan")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(name="test-secure") as lab:
        assert lab.run_dir is not None
        config = lab.run_dir / "lab.json"
        config.write_text(json.dumps(CONFIG))
        lab.start_proxy(config=config)
        for name in ("a1", "b1", "a2"):
            lab.start_terminal(name, config=config, media_once=True)
        yield lab


def samples(wav: Path) -> int:
    return len(load_pcm(wav)) // 2  # 16-bit mono


def node(lab: Lab, name: str) -> NodeControl:
    return lab.nodes[name]


def sas_between(status: dict, ip: str) -> list[dict]:
    return [sa for sa in status["ipsec"]["sas"] if ip in (sa["src"], sa["dst"])]


@pytest.fixture(scope="module")
def registered(lab: Lab) -> None:
    for name in ("a1", "b1"):
        assert node(lab, name)("register")["status"] == 200


def test_registration_installs_four_sas_each_side(lab: Lab, registered: None) -> None:
    proxy = node(lab, "proxy")("status")
    for name, ip in (("a1", A1), ("b1", B1)):
        mine = node(lab, name)("status")["ipsec"]
        assert len(mine["sas"]) == 4, mine
        assert len(mine["policies"]) == 4
        assert len(sas_between(proxy, ip)) == 4
        assert {sa["spi"] for sa in mine["sas"]} == {sa["spi"] for sa in sas_between(proxy, ip)}


def test_sip_on_the_wire_is_esp_only_after_registration(lab: Lab, registered: None) -> None:
    assert node(lab, "a1")("message", to="b1", text="over ESP")["status"] == 200
    pcap = lab.pcaps["a1-wlan"]
    flt = f"ip.addr=={PROXY} && ip.addr=={A1}"
    wait_until(lambda: tshark_fields(pcap, f"{flt} && esp", ["esp.spi"]), 10, "ESP in the capture")
    # Only Fig 1's first REGISTER and its 401 are plaintext, on port 5060; nothing else.
    plain = tshark_fields(pcap, f"{flt} && udp", ["udp.srcport", "udp.dstport", "sip.Method",
                                                  "sip.Status-Code"])
    assert plain, "the unprotected REGISTER/401 exchange should be visible"
    assert all("5060" in (row[0], row[1]) for row in plain), plain
    assert all(row[2] == "REGISTER" or row[3] == "401" for row in plain), plain
    # With the run's esp_sa file the ESP decrypts to SIP.
    assert lab.run_dir is not None
    rows = tshark_fields(pcap, f"{flt} && esp && sip", ["sip.CSeq.method"],
                         tshark_args(lab.run_dir / "esp_sa"))
    assert any("MESSAGE" in r[0] for r in rows), rows


def test_secure_call_media_in_esp_and_wav_length(lab: Lab, registered: None) -> None:
    a1, b1 = node(lab, "a1"), node(lab, "b1")
    call = a1("call", to="b1")
    assert call["status"] == 200
    cid = call["call_id"]
    media = a1("status")["calls"][cid]["media"]
    frames = samples(PROJECT / "media" / "speech_8k.wav") // 160
    wait_until(lambda: (a1("status")["calls"][cid]["media"]["tx"] or {}).get("frames") == frames,
               40, "a1 to send the whole sample")
    wait_until(lambda: b1("status")["calls"][cid]["media"]["tx"]["frames"] == frames, 40,
               "b1 to send the whole sample")
    time.sleep(0.5)
    b1_media = b1("status")["calls"][cid]["media"]
    assert a1("hangup", call_id=cid)["status"] == 200
    # RTP on the wire between a1 and b1: ESP only.
    pcap = lab.pcaps["b1-netb"]
    between = f"ip.addr=={A1} && ip.addr=={B1}"
    assert tshark_fields(pcap, f"{between} && udp", ["udp.srcport"]) == []
    esp = tshark_fields(pcap, f"{between} && esp && ip.src=={A1}", ["esp.spi"])
    assert {int(r[0], 16) for r in esp} == {media["spi_out"]}
    # Decrypted with the run's esp_sa file: RTP with consecutive sequence numbers.
    assert lab.run_dir is not None
    port = int(b1_media["local"].split(":")[1])
    seqs = [int(r[0]) for r in tshark_fields(
        pcap, f"rtp && ip.src=={A1}", ["rtp.seq"],
        [*tshark_args(lab.run_dir / "esp_sa"), "-d", f"udp.port=={port},rtp"])]
    assert len(seqs) == frames
    # Consecutive: no hole and no duplicate between the first and the last (two packets may
    # swap places on a busy machine's path: the capture shows them in arrival order).
    loss = rtp_loss((0, seq) for seq in seqs)
    assert (loss["lost"], loss["duplicates"]) == (0, 0), loss
    # The received speech has the sample's length within one frame.
    wav = lab.run_dir / "media" / "b1-call1.wav"
    assert abs(samples(wav) - frames * 160) <= 160


def test_no_media_sa_after_bye(lab: Lab, registered: None) -> None:
    call = node(lab, "a1")("call", to="b1")
    cid = call["call_id"]
    for name in ("a1", "b1"):
        wait_until(lambda n=name: len(node(lab, n)("status")["ipsec"]["sas"]) == 6, 10,
                   f"{name}'s media SAs")
    node(lab, "b1")("hangup", call_id=cid)  # the callee hangs up this time
    for name in ("a1", "b1"):
        wait_until(lambda n=name: len(node(lab, n)("status")["ipsec"]["sas"]) == 4, 10,
                   f"{name}'s media SAs to go")


def test_wrong_psk_fails_and_leaves_nothing(lab: Lab) -> None:
    proxy = node(lab, "proxy")
    before = proxy("status")["ipsec"]["counters"]["integrity_failed"]
    result = _attack(lab, "b2", "b2", "wrongpsk")
    assert result["register"] == ("registration failed: no answer on the protected channel "
                                  "— wrong PSK?"), result
    assert result["sas_left"] == 0
    assert proxy("status")["ipsec"]["counters"]["integrity_failed"] > before
    wait_until(lambda: sas_between(proxy("status"), address("b2", "netb")) == [] and
               proxy("status")["pending"] == 0, 20, "the proxy to drop b2's pending SAs")
    assert "sip:b2@m2m.example" not in proxy("status")["registrations"]


def _attack(lab: Lab, host: str, name: str, attack: str) -> dict:
    assert lab.caps is not None
    out = lab.host(host).cmd(
        f"cd {PROJECT} && PYTHONPATH={PROJECT} {python()} tests/lab/secattack.py "
        f"--name {name} --local {address(host, 'netb' if host.startswith('b') else 'wlan')} "
        f"--proxy {PROXY} --ipsec {lab.caps.ipsec_backend} "
        f"--credentials {DEFAULT_CREDENTIALS} {attack}")
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("attack", "expect"),
    [
        ("malformed", {"status": 400}),
        ("nomech", {"status": 494}),
        ("downgrade", {"register": "registration refused: 494 Security-Verify mismatch"}),
    ],
)
def test_registration_refusals_leave_no_sa(lab: Lab, attack: str, expect: dict) -> None:
    result = _attack(lab, "b2", "b2", attack)
    for key, value in expect.items():
        assert result[key] == value, result
    assert result["sas_left"] == 0
    proxy = node(lab, "proxy")
    wait_until(lambda: sas_between(proxy("status"), address("b2", "netb")) == [], 10,
               "no proxy SA for b2")
    assert "sip:b2@m2m.example" not in proxy("status")["registrations"]


def test_spoofed_from_over_the_channel_is_403(lab: Lab, registered: None) -> None:
    result = _attack(lab, "b2", "b2", "spoof")
    assert (result["register"], result["status"]) == (200, 403), result
    assert result["sas_while_registered"] == 4 and result["sas_left"] == 0


def test_plaintext_after_registration_is_discarded(lab: Lab, registered: None) -> None:
    before = node(lab, "proxy")("status")["counters"].get("dropped-unprotected", 0)
    result = _attack(lab, "b2", "b2", "plain")
    assert (result["register"], result["status"]) == (200, 0), result
    assert node(lab, "proxy")("status")["counters"]["dropped-unprotected"] == before + 1


def test_unregistered_invite_gets_no_answer(lab: Lab, registered: None) -> None:
    with pytest.raises(NodeError, match="not registered"):  # a UA that knows it is not
        node(lab, "a2")("call", to="b1")
    before = node(lab, "proxy")("status")["counters"].get("dropped-unregistered", 0)
    out = lab.host("b2").cmd(
        f"cd {PROJECT} && PYTHONPATH={PROJECT} {python()} tests/lab/sipsend.py "
        f"--local {address('b2', 'netb')} --proxy {PROXY} --as b2 INVITE:b1")
    assert [r["status"] for r in json.loads(out.strip().splitlines()[-1])] == [0]
    assert node(lab, "proxy")("status")["counters"]["dropped-unregistered"] == before + 1
    assert len(node(lab, "b1")("status")["ipsec"]["sas"]) == 4  # no media SA was made


def test_non_friend_call_is_403(lab: Lab, registered: None) -> None:
    a2 = node(lab, "a2")
    assert a2("register")["status"] == 200
    try:
        assert a2("call", to="b1")["status"] == 403  # carol and bob are not friends
        assert node(lab, "a1")("call", to="a2")["status"] == 403
        for name in ("a1", "b1", "a2"):
            assert len(node(lab, name)("status")["ipsec"]["sas"]) == 4  # no media SA
    finally:
        a2("unregister")
    assert a2("status")["ipsec"]["sas"] == []
    wait_until(lambda: sas_between(node(lab, "proxy")("status"), A2) == [], 10,
               "the proxy to remove a2's SAs after deregistration")


def test_esp_sa_file_has_no_keys_in_logs(lab: Lab) -> None:
    assert lab.run_dir is not None
    keys = {row.split(",")[5].strip('"') for row in
            (lab.run_dir / "esp_sa").read_text().splitlines()} - {""}
    assert keys
    for log in Path(lab.run_dir, "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        leaked = [k for k in keys if k.removeprefix("0x") in text]
        assert not leaked, f"{log.name} contains SA keys"


# -- a registered terminal's port 5060 (Fig 1 starts there, and nothing else does) ------------
# Run on host b2 (no SAs there): hand-made plaintext requests straight at a terminal, each sent
# three times like a UA's retransmissions; prints what came back to each, as JSON.
_PLAINTEXT_AT_TERMINAL = r'''
import base64, json, os, random, socket, sys, time
src, dst, cid = sys.argv[1], sys.argv[2], sys.argv[3]
key = (base64.b64encode(os.urandom(16)).decode()
       + f";spi={random.randint(4096, 2**31)};ealg=aes-cbc;alg=hmac-sha-256-128")
sdp = (f"v=0\r\no=- 1 1 IN IP4 {src}\r\ns=x\r\nc=IN IP4 {src}\r\nt=0 0\r\n"
       f"m=audio 40000 RTP/AVP 0\r\na=m2m-key:{key}\r\n")
bodies = {"INVITE": ("sip:a1@m2m.example", "application/sdp", sdp),
          "MESSAGE": ("sip:sms@m2m.example", "application/smig+json",
                      json.dumps({"type": "end", "session": cid}))}
out = {}
for method, (frm, ctype, body) in bodies.items():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    port = s.getsockname()[1]
    tag = random.getrandbits(32)
    msg = (f"{method} sip:b1@{dst} SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP {src}:{port};branch=z9hG4bK{tag:x};rport\r\n"
           f"Max-Forwards: 70\r\nFrom: <{frm}>;tag=p{tag}\r\nTo: <sip:b1@m2m.example>\r\n"
           f"Call-ID: plain{tag}@b2\r\nCSeq: 1 {method}\r\n"
           f"Contact: <sip:a1@{src}:{port}>\r\nContent-Type: {ctype}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    got, end = [], time.time() + 1.5
    for _ in range(3):
        s.sendto(msg, (dst, 5060))
        s.settimeout(0.2)
        try:
            got.append(s.recv(65535).split(b"\r\n")[0].decode())
        except socket.timeout:
            pass
    while time.time() < end:
        try:
            got.append(s.recv(65535).split(b"\r\n")[0].decode())
        except socket.timeout:
            pass
    out[method] = got
print(json.dumps(out))
'''


def test_plaintext_at_a_registered_terminal_gets_no_answer(lab: Lab, registered: None
                                                           ) -> None:
    """From a host with no SAs, a plaintext INVITE claiming to be a1 (it used to get 200 and
    a call keyed with the attacker's nonce) and a SMIG `end` for b1's live call claiming to
    be the SMS (it ended the call) go to b1's port 5060: no answer, nothing changes."""
    a1, b1 = node(lab, "a1"), node(lab, "b1")
    cid = a1("call", to="b1")["call_id"]
    try:
        wait_until(lambda: cid in b1("status")["calls"], 10, "b1's dialog")
        before = b1("status")
        assert lab.run_dir is not None
        script = lab.run_dir / "plaintext_at_terminal.py"
        script.write_text(_PLAINTEXT_AT_TERMINAL)
        out = lab.host("b2").cmd(f"{python()} {script} {address('b2', 'netb')} {B1} {cid}")
        assert json.loads(out.strip().splitlines()[-1]) == {"INVITE": [], "MESSAGE": []}
        after = b1("status")
        assert list(after["calls"]) == [cid]
        media_before, media_after = before["calls"][cid]["media"], after["calls"][cid]["media"]
        for field in ("local", "remote", "spi_in", "spi_out"):
            assert media_after[field] == media_before[field]
        assert media_after["tx"] is not None  # b1 still sends on the call
        assert len(after["ipsec"]["sas"]) == 6  # registration and this call's media SAs
        counters = after["counters"]
        assert counters["dropped-unprotected"] >= \
            before["counters"].get("dropped-unprotected", 0) + 6  # 2 requests, 3 times
        assert counters.get("rx-INVITE") == before["counters"].get("rx-INVITE")
        assert counters.get("rx-MESSAGE") == before["counters"].get("rx-MESSAGE")
    finally:
        assert a1("hangup", call_id=cid)["status"] == 200


# -- a client that does not play along (the proxy's admission and policy) --------------------
FLOOD = """
import socket, sys
ip, proxy, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, 0)); s.settimeout(0.005)
for i in range(n):
    sc = (f"ipsec-m2ms;alg=hmac-sha-256-128;ealg=aes-cbc;prot=esp;mod=trans;"
          f"spi-c={10000 + 2 * i};spi-s={10001 + 2 * i};port-c={20000 + i};port-s={30000 + i}")
    m = (f"REGISTER sip:m2m.example SIP/2.0\\r\\nVia: SIP/2.0/UDP {ip}:{s.getsockname()[1]};"
         f"branch=z9hG4bKflood{i}\\r\\nMax-Forwards: 70\\r\\nFrom: <sip:b2@m2m.example>;tag={i}"
         f"\\r\\nTo: <sip:b2@m2m.example>\\r\\nCall-ID: flood{i}@x\\r\\nCSeq: 1 REGISTER\\r\\n"
         f"Contact: <sip:b2@{ip}:{20000 + i}>\\r\\nSecurity-Client: {sc}\\r\\n"
         "Require: sec-agree\\r\\nProxy-Require: sec-agree\\r\\nContent-Length: 0\\r\\n\\r\\n")
    s.sendto(m.encode(), (proxy, 5060))
    try:
        while True:
            s.recvfrom(65535)
    except OSError:
        pass
"""

FORGE = """
import socket, sys
ip, proxy, a1, port_c = sys.argv[1:5]
m = ("SIP/2.0 200 OK\\r\\nVia: SIP/2.0/UDP " + proxy + ":5060;branch=z9hG4bKforged\\r\\n"
     "Via: SIP/2.0/UDP " + a1 + ":" + port_c + ";branch=z9hG4bKinjected\\r\\n"
     "From: <sip:b1@m2m.example>;tag=1\\r\\nTo: <sip:a1@m2m.example>;tag=2\\r\\n"
     "Call-ID: forged@x\\r\\nCSeq: 1 MESSAGE\\r\\nContent-Length: 0\\r\\n\\r\\n")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, 0))
s.sendto(m.encode(), (proxy, 5060))
"""


def _script(lab: Lab, host: str, name: str, text: str, *args: object) -> str:
    assert lab.run_dir is not None
    path = lab.run_dir / name
    path.write_text(text)
    return lab.host(host).cmd(f"{python()} {path} " + " ".join(str(a) for a in args))


def test_non_friend_cannot_call_a_registered_contact(lab: Lab, registered: None) -> None:
    """carol's a2 used b1's registered contact as the target: the policy covers it."""
    a2 = node(lab, "a2")
    assert a2("register")["status"] == 200
    try:
        contact = node(lab, "proxy")("status")["registrations"]["sip:b1@m2m.example"][0]
        assert a2("call", to=contact["contact"])["status"] == 403
        assert a2("message", to=contact["contact"], text="hi")["status"] == 403
        assert len(node(lab, "b1")("status")["ipsec"]["sas"]) == 4  # no media SA
    finally:
        a2("unregister")


def test_forged_response_from_a_stranger_is_dropped(lab: Lab, registered: None) -> None:
    """A plaintext 200 to port 5060 from a host with no registration, its second Via naming
    a1's protected port-c: dropped unread, nothing goes into a1's channel."""
    proxy, a1 = node(lab, "proxy"), node(lab, "a1")
    port_c = next(k for k, v in proxy("status")["channels"].items()
                  if v == "a1" and k.startswith(A1)).split(":")[1]
    before = proxy("status")["counters"]
    a1_in = a1("status")["ipsec"]["counters"]["packets_in"]
    _script(lab, "b2", "forge.py", FORGE, address("b2", "netb"), PROXY, A1, port_c)
    wait_until(lambda: proxy("status")["counters"].get("dropped-response", 0) ==
               before.get("dropped-response", 0) + 1, 10, "the proxy to drop the response")
    time.sleep(0.3)
    after = proxy("status")["counters"]
    assert after.get("fwd-2xx-retransmission", 0) == before.get("fwd-2xx-retransmission", 0)
    assert a1("status")["ipsec"]["counters"]["packets_in"] == a1_in


def test_nested_link_switch_body_is_400_and_leaves_no_sa(lab: Lab, registered: None) -> None:
    proxy, a1 = node(lab, "proxy"), node(lab, "a1")
    lte = address("a1", "lte")
    with pytest.raises(NodeError, match="registration refused: 400"):
        a1("register", via="a1-lte", body="[" * 3000 + "]" * 3000)
    wait_until(lambda: sas_between(proxy("status"), lte) == [] and
               proxy("status")["pending"] == 0, 10, "the proxy to drop the pending SAs")
    assert all(sa["dst"] != lte and sa["src"] != lte for sa in a1("status")["ipsec"]["sas"])


def test_register_flood_from_one_host_is_bounded(lab: Lab, registered: None) -> None:
    """400 Security-Client REGISTERs from b2: a few pending associations at most, all along
    (a new one replaces the oldest), and a terminal still registers while the flood lasts.
    (How fast the proxy stays under the flood is a speed: `make bench`, not a test.)"""
    proxy = node(lab, "proxy")
    b2 = address("b2", "netb")
    start = proxy("status")
    before, channel_sas = start["counters"].get("rx-REGISTER", 0), len(sas_between(start, b2))
    assert lab.run_dir is not None
    script = lab.run_dir / "flood.py"
    script.write_text(FLOOD)
    lab.host("b2").cmd(f"{python()} {script} {b2} {PROXY} 400 >/dev/null 2>&1 &")
    most_pending, most_sas, a1_registered = 0, 0, False
    deadline = time.monotonic() + 60
    while True:
        status = proxy("status")
        most_pending = max(most_pending, status["pending"])
        most_sas = max(most_sas, len(sas_between(status, b2)) - channel_sas)
        if not a1_registered:  # once, while the flood runs
            assert node(lab, "a1")("register")["status"] == 200  # a fresh channel for a1
            a1_registered = True
        if status["counters"].get("rx-REGISTER", 0) >= before + 400 + 2:
            break
        assert time.monotonic() < deadline, "the flood took over a minute"
        time.sleep(0.1)
    assert most_pending <= 4 and most_sas <= 16, (most_pending, most_sas)
    wait_until(lambda: len(sas_between(proxy("status"), b2)) == channel_sas, 20,
               "b2's pending SAs to go")
