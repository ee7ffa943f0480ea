"""The lab: boots the M2M topology under the Ryu controller, runs processes in its hosts,
captures every host interface, and tears down exactly what it created.

    with Lab(name="demo") as lab:
        lab.start_probe()
        fault = lab.faults.inject("wlan", "wlan-a1", "down")
        ...

Teardown runs on success, on exceptions and on Ctrl-C, SIGTERM and SIGHUP (the runners turn
them into KeyboardInterrupt: experiments.console), with further signals held off until it is
done. Processes the lab starts get SIGTERM when its process dies, even by SIGKILL; what such a
run leaves behind (bridges, links: its manifest.json) the next lab removes at start. It never calls
`mn -c`: other labs' bridges and controllers on the machine are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from experiments.capabilities import Capabilities, probe
from experiments.console import STOP_SIGNALS
from experiments.control import NodeControl
from experiments.faults import FaultClient
from experiments.pcaps import capture_shortfall
from topologies.m2m import ACCESS_NETWORKS, M2M_HOSTS, M2M_NETWORKS, M2MTopo, address

PROJECT = Path(__file__).resolve().parent.parent
CAPTURES = PROJECT / "captures"
VENV_PYTHON = PROJECT / ".venv" / "bin" / "python"
PROBE_PORT = 9000
# tcpdump's ring: immediate mode gives one slot of SNAPLEN a packet (the default snaplen,
# 256 KiB, left room for only some tens, and a burst after a port came back overflowed it).
CAPTURE_BUFFER_KIB, SNAPLEN = 8192, 4096  # every packet here fits a 1500-byte MTU
# Slow machines (the kernel-path VM runs under QEMU/TCG) stretch every wait_until() timeout.
TIMEOUT_SCALE = float(os.environ.get("SMIG_TIMEOUT_SCALE") or 1)
DEFAULT_CONFIG = PROJECT / "config" / "lab.json"
DEFAULT_CREDENTIALS = PROJECT / "config" / "credentials.json"
DEFAULT_TRUST = PROJECT / "config" / "trust.json"
TERMINALS = ("a1", "a2", "b1", "b2")


def config_problem(config: Path = DEFAULT_CONFIG, credentials: Path = DEFAULT_CREDENTIALS,
                   trust: Path = DEFAULT_TRUST) -> str | None:
    """What the nodes would refuse in the lab's config files, checked by the nodes' own
    loaders before any lab boots (their message, one line), or None if they would start."""
    from nodes.labconfig import ConfigError, Credentials, LabConfig
    from nodes.trust import load_key

    try:
        lab = LabConfig.load(config)
        creds = Credentials.load(credentials)
        for name in TERMINALS:
            lab.require_terminal(name)
            if creds.psk(name) is None:
                raise ConfigError(f"{credentials}: no PSK for {name!r}")
        load_key(trust)
    except ConfigError as exc:
        return str(exc)
    return None


def last_log_line(log: Path) -> str | None:
    """The last non-blank line of a node's log: its one-line error when it refused to start
    (or the last line of its traceback)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1] if lines else None


def python() -> str:
    """Node programs run on the venv's interpreter (pyenv's python3 shadows it on PATH)."""
    return str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy; TimeoutError names `what`."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


_PR_SET_PDEATHSIG = 1


def _die_with_the_lab() -> None:
    """Runs in each child before exec: SIGTERM to it when the lab's process dies, even by
    SIGKILL, when no teardown can run (node programs clean up on SIGTERM). Survives exec
    and mnexec's setsid; the lab starts its children from its main thread."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUN_NAME_MAX = 64
_RUN_NAME_RE = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{RUN_NAME_MAX - 1}}}\Z")


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run folder (captures/<stamp>-<name>), or None if it can."""
    if not isinstance(name, str) or not _RUN_NAME_RE.match(name):
        shown = (f"{name[:RUN_NAME_MAX]!r}... ({len(name)} characters)"
                 if isinstance(name, str) and len(name) > RUN_NAME_MAX else repr(name))
        return (f"run name {shown}: expected 1 to {RUN_NAME_MAX} characters of A-Z a-z 0-9 "
                f". _ -, not starting with '.'")
    return None


def new_run_dir(name: str, captures: Path | None = None) -> Path:
    problem = run_name_problem(name)
    if problem:
        raise LabError(problem)
    captures = captures or CAPTURES
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        run = captures / (f"{stamp}-{name}" + (f"-{n}" if n else ""))
        try:
            run.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as exc:
            raise LabError(f"cannot create the run folder {run}: {exc.strerror or exc}"
                           ) from None
        for sub in ("logs", "pcaps", "events"):
            (run / sub).mkdir()
        return run
    raise LabError(f"could not create a run folder under {captures}")


class LabError(RuntimeError):
    """The lab cannot start here (the runners print it as one line, no traceback)."""


LOCK_PATH = Path(os.environ.get("SMIG_LAB_LOCK") or "/run/smig-lab.lock")


class MachineLock:
    """One lab per machine (its bridge and interface names are fixed): an exclusive flock
    held while the lab lives. The kernel drops it when the process dies, however it dies, so
    a held lock always means a live lab; the file names that lab's process and run."""

    def __init__(self, path: Path = LOCK_PATH) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1000).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LabError(f"another smig-lab lab is running on this machine ({holder}); "
                           f"one at a time: its bridges and interfaces have fixed names"
                           ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {what}".encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): with the pid, it names the process
    exactly, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def lab_link_names() -> set[str]:
    """The interface names the topology creates in the root namespace (both ends of each
    veth start there)."""
    names = {f"{net}-r0" for net in M2M_NETWORKS} | {f"r0-{net}" for net in M2M_NETWORKS}
    for host, nets in M2M_HOSTS.items():
        names |= {n for net, _ in nets for n in (f"{net}-{host}", f"{host}-{net}")}
    return names


def ovs_bridges(check: bool = False) -> set[str]:
    """The OVS bridges on this machine (`check`: an unreachable OVS is a LabError, not none)."""
    out = subprocess.run(["ovs-vsctl", "--timeout=5", "list-br"], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise LabError(f"Open vSwitch is not answering ({out.stderr.strip() or 'ovs-vsctl failed'})"
                       "; start it with 'make setup' or "
                       "'/usr/share/openvswitch/scripts/ovs-ctl start'")
    return set(out.stdout.split())


def delete_bridges(names: list[str]) -> list[str]:
    """Delete those of `names` that exist; returns the ones deleted."""
    existing = ovs_bridges()
    gone = [br for br in names if br in existing]
    for br in gone:
        subprocess.run(["ovs-vsctl", "--timeout=5", "--if-exists", "del-br", br], check=False)
    return gone


def stale_runs(captures: Path = CAPTURES) -> list[Path]:
    """Run folders whose lab never stopped and whose runner is gone (killed with SIGKILL, or
    the machine's OOM killer): what they created may still be there, and is theirs."""
    found = []
    for manifest in sorted(captures.glob("*/manifest.json")):
        try:
            m = json.loads(manifest.read_text())
            runner = m.get("runner") or {}
            pid, started = int(runner["pid"]), runner["started"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if m.get("stopped") is False and _start_time(pid) != started:
            found.append(manifest.parent)
    return found


def analysis_command(run_dir: Path) -> str:
    """The command that analyses a run's finished trials (for runs whose analysis did not
    run or finish)."""
    try:
        where = run_dir.resolve().relative_to(PROJECT)
    except ValueError:
        where = run_dir
    return f".venv/bin/python -m experiments.analysis {where}"


def clean_stale_run(run_dir: Path, say: Callable[[str], None]) -> list[str]:
    """Remove what a dead run left (its bridges and links, by its manifest) and mark it
    stopped; returns what was removed. Its processes died with it (PR_SET_PDEATHSIG)."""
    manifest = run_dir / "manifest.json"
    m = json.loads(manifest.read_text())
    removed = [f"bridge {br}" for br in delete_bridges(m.get("bridges", []))]
    for link in m.get("links", []):
        if Path(f"/sys/class/net/{link}").exists():
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
            removed.append(f"link {link}")
    m.update(stopped=True, cleaned_up_after_its_death=True)
    manifest.write_text(json.dumps(m, indent=2) + "\n")
    trials = run_dir / "trials.jsonl"
    hint = ""
    if trials.exists() and trials.stat().st_size and not (run_dir / "results.json").exists():
        hint = f"; its finished trials can be analysed: {analysis_command(run_dir)}"
    say(f"removed what the killed run {run_dir.name} left: "
        f"{', '.join(removed) if removed else 'nothing'}{hint}")
    return removed


@dataclass
class Proc:
    """A process the lab started (in a host or the root namespace); its own session/group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes] | None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        # The process itself (it may not have made its own session yet: mnexec does that
        # after the fork), then its group, to reach anything it started.
        for kill in (os.kill, os.killpg):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(self.popen.pid, sig)

    def stop(self, grace: float = 3.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(grace)
        if self.log is not None:
            self.log.close()
            self.log = None
        return self.popen.returncode


class Lab:
    def __init__(
        self,
        name: str = "lab",
        links: dict[str, dict[str, Any]] | None = None,
        run_dir: Path | None = None,
        capture: bool = True,
        mininet_log: str = "warning",
        ctl_dir: Path | None = None,
    ) -> None:
        problem = run_name_problem(name)
        if problem:
            raise LabError(problem)
        self.name = name
        self.run_dir = run_dir
        self._made_run_dir = False  # start() made run_dir (and removes it if it refuses)
        self._refused = False
        self.capture = capture
        self.mininet_log = mininet_log
        # Control sockets; default <run>/ctl. A run folder on 9p/virtiofs (the VM's) cannot
        # hold Unix sockets, so the caller may put them elsewhere.
        # Unix control sockets cannot live on some shared folders (the VM's 9p run folder):
        # $SMIG_CTL_DIR puts them elsewhere.
        env_ctl = os.environ.get("SMIG_CTL_DIR")
        self.ctl_dir = ctl_dir or (Path(env_ctl) if env_ctl else None)
        self.requested_links = links or {}
        self.caps: Capabilities | None = None
        self.net: Any = None
        self.faults: FaultClient | None = None
        self.procs: list[Proc] = []
        self.nodes: dict[str, NodeControl] = {}
        self.pcaps: dict[str, Path] = {}
        self.incomplete_captures: dict[str, str] = {}  # interface: what its pcap misses
        self._controller: Proc | None = None
        self._created_bridges: list[str] = []
        self._lock = MachineLock()
        self._stopped = False

    # -- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Lab:
        from mininet.log import setLogLevel

        setLogLevel(self.mininet_log)
        self._lock.acquire(f"lab {self.name!r} in {PROJECT}")
        if self.run_dir is None:
            self.run_dir = new_run_dir(self.name)
            self._made_run_dir = True
        self.say(f"run folder {self.run_dir.relative_to(PROJECT)}")
        self.caps = probe()
        for line in self.caps.summary().splitlines():
            self.say(line)
        self._write_json("capabilities.json", self.caps.to_dict())
        for stale in stale_runs():  # with the lock held, no lab of ours is alive
            clean_stale_run(stale, self.say)
        self._refuse_foreign(check_links=True)
        of_port = self._start_controller()
        self._start_mininet(of_port)
        self._wait_for_switches()
        if self.capture:
            self._start_captures()
        self.say("lab is up")
        return self

    def stop(self) -> None:
        """Tear down what this lab created; safe to call twice; holds off SIGINT/TERM/HUP."""
        if self._stopped:
            return
        self._stopped = True
        if not self._lock.held:  # refused at start (another lab runs): nothing of ours is up
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
        try:
            for proc in reversed(self.procs):  # nodes first, captures last: they see the end
                code = proc.stop()
                if code not in (0, -signal.SIGTERM, None):
                    self.say(f"{proc.name} exited with {code} (log: logs/{proc.name}.log)")
            self._check_captures()
            if self.net is not None:
                with contextlib.suppress(Exception):
                    self.net.stop()
                # RemoteController.stop() is a no-op in Mininet: its shell would outlive us.
                for ctl in self.net.controllers:
                    with contextlib.suppress(Exception):
                        ctl.terminate()
            self._delete_leftover_bridges()
            if self._controller is not None:
                self._controller.stop()
            if self.net is not None:
                self._write_json("manifest.json", self._manifest(stopped=True))
            self._remove_refused_run_dir()
            self._lock.release()
            self.say("lab is down")  # before a signal held off meanwhile is delivered
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _remove_refused_run_dir(self) -> None:
        """A lab refused at start (another lab's bridges, OVS not answering) ran nothing: the
        run folder it made holds only its capabilities, and goes."""
        if not (self._refused and self._made_run_dir and self.run_dir is not None):
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if not self.run_dir.exists():
            self.say(f"removed the run folder {self.run_dir.name} (the lab did not start)")

    # -- pieces of start() ----------------------------------------------------------------------
    def _refuse_foreign(self, check_links: bool) -> None:
        """Another lab's bridges (or, before we build ours, its links) mean: not here."""
        try:
            self._check_foreign(check_links)
        except LabError:
            self._refused = True
            raise

    def _check_foreign(self, check_links: bool) -> None:
        clash = sorted(ovs_bridges(check=True) & set(M2M_NETWORKS))
        if clash:
            raise LabError(
                f"OVS bridge(s) {', '.join(clash)} already exist: another lab is running, or a "
                f"lab from another checkout was killed. Remove them with 'ovs-vsctl del-br "
                f"NAME' once you are sure they are not in use."
            )
        if not check_links:
            return
        links = sorted(n for n in lab_link_names() if Path(f"/sys/class/net/{n}").exists())
        if links:
            raise LabError(
                f"network interface(s) {', '.join(links[:6])}{' ...' if len(links) > 6 else ''}"
                f" already exist: another lab is starting or running. Remove them with 'ip link"
                f" del NAME' once you are sure they are not in use."
            )

    def _start_controller(self) -> int:
        assert self.run_dir is not None
        of_port, rest_port = _free_tcp_port(), _free_tcp_port()
        log = open(self.run_dir / "logs" / "controller.log", "wb")  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=str(PROJECT),
                   SMIG_CONTROLLER_EVENTS=str(self.run_dir / "events" / "controller.jsonl"))
        popen = subprocess.Popen(
            [python(), "-m", "nodes.ryu_launcher", "--ofp-tcp-listen-port", str(of_port),
             "--wsapi-host", "127.0.0.1", "--wsapi-port", str(rest_port),
             str(PROJECT / "nodes" / "controller.py")],
            cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_the_lab,
        )
        self._controller = Proc("controller", popen, log)
        self.faults = FaultClient(f"http://127.0.0.1:{rest_port}")

        def rest_up() -> bool:
            if not self._controller or not self._controller.alive():
                assert self.run_dir is not None
                why = last_log_line(self.run_dir / "logs" / "controller.log")
                raise LabError("the Ryu controller exited at start"
                               + (f": {why}" if why else "") + " (log: logs/controller.log)")
            try:
                assert self.faults is not None
                self.faults.switches()
                return True
            except OSError:
                return False

        wait_until(rest_up, 30, "the Ryu controller's REST API")
        self.say(f"controller up: OpenFlow 127.0.0.1:{of_port}, REST 127.0.0.1:{rest_port}")
        return of_port

    def _start_mininet(self, of_port: int) -> None:
        from mininet.link import TCLink
        from mininet.net import Mininet
        from mininet.node import OVSSwitch, RemoteController

        assert self.caps is not None
        links = self._usable_links()
        switch = partial(OVSSwitch, datapath=self.caps.ovs_datapath, protocols="OpenFlow13")
        self.net = Mininet(topo=M2MTopo(links=links), switch=switch, controller=None,
                           link=TCLink, autoSetMacs=True, build=False)
        class Ryu(RemoteController):  # type: ignore[misc]
            def checkListening(self) -> None:
                """Already checked (its REST API answers); Mininet's telnet check can die
                decoding the binary OpenFlow HELLO it reads."""

        self.net.addController(Ryu("c0", ip="127.0.0.1", port=of_port))
        self.net.build()  # hosts and links; the bridges come with start()
        self._refuse_foreign(check_links=False)  # again: another lab may have started
        self._created_bridges = list(M2M_NETWORKS)
        self._write_json("manifest.json", self._manifest(stopped=False))
        self.net.start()

    def _usable_links(self) -> dict[str, dict[str, Any]]:
        """Drop the link parameters this kernel cannot honour, saying so once."""
        assert self.caps is not None
        links: dict[str, dict[str, Any]] = {}
        for net, params in self.requested_links.items():
            if net not in M2M_NETWORKS:
                raise ValueError(f"unknown network {net!r} in link parameters "
                                 f"(known: {', '.join(M2M_NETWORKS)})")
            keep = dict(params)
            if not self.caps.netem:
                dropped = [k for k in ("delay", "jitter", "loss") if keep.pop(k, None)]
                if dropped:
                    self.say(f"notice: {net}: {', '.join(dropped)} ignored (no netem in this "
                             f"kernel); the run continues without them")
            links[net] = keep
        return links

    def _wait_for_switches(self) -> None:
        assert self.faults is not None
        want = set(M2M_NETWORKS)

        def all_connected() -> bool:
            assert self.faults is not None
            seen = {s["name"] for s in self.faults.switches() if s["ports"]}
            return want <= seen

        wait_until(all_connected, 30, f"switches {sorted(want)} to connect to the controller")

    def _start_captures(self) -> None:
        assert self.run_dir is not None
        for host in self.net.hosts:
            for intf in host.intfNames():
                if intf == "lo":
                    continue
                pcap = self.run_dir / "pcaps" / f"{intf}.pcap"
                # Immediate mode: libpcap otherwise holds packets in its ring for up to a
                # second, and those still there when tcpdump is stopped never reach the pcap.
                self.popen(host.name, ["tcpdump", "-i", intf, "-n", "-U", "--immediate-mode",
                                       "-B", str(CAPTURE_BUFFER_KIB), "-s", str(SNAPLEN),
                                       "-Z", "root", "-w", str(pcap)], name=f"tcpdump-{intf}")
                self.pcaps[intf] = pcap
        # tcpdump writes the pcap header once it is listening.
        wait_until(lambda: all(p.exists() and p.stat().st_size >= 24
                               for p in self.pcaps.values()), 20, "tcpdump on every interface")

    # -- running things ---------------------------------------------------------------------------
    def host(self, name: str) -> Any:
        return self.net[name]

    def popen(
        self, host: str, args: list[str], name: str, env: dict[str, str] | None = None
    ) -> Proc:
        """Start `args` inside `host`, output to logs/<name>.log; stopped at teardown."""
        assert self.run_dir is not None
        log = open(self.run_dir / "logs" / f"{name}.log", "wb")  # noqa: SIM115
        full_env = dict(os.environ, PYTHONPATH=str(PROJECT), **(env or {}))
        popen = self.host(host).popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT,
                                      env=full_env, preexec_fn=_die_with_the_lab)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        if self.net is not None:  # the manifest names every process while the lab runs
            self._write_json("manifest.json", self._manifest(stopped=False))
        return proc

    def start_node(self, host: str, module: str, name: str, args: list[str]) -> NodeControl:
        """Start a node program (`python -m <module>`) in `host` with its event log and
        control socket in the run folder; returns the control client once it answers."""
        assert self.run_dir is not None
        ctl_dir = self.ctl_dir or self.run_dir / "ctl"
        ctl_dir.mkdir(parents=True, exist_ok=True)
        sock = ctl_dir / f"{name}.sock"
        events = self.run_dir / "events" / f"{name}.jsonl"
        proc = self.popen(host, [python(), "-m", module, *args, "--events", str(events),
                                 "--control", str(sock)], name=name)

        log = self.run_dir / "logs" / f"{name}.log"

        def ready() -> bool:
            if not proc.alive():
                why = last_log_line(log)
                raise LabError(f"{name} exited at start (code {proc.popen.returncode})"
                               + (f": {why}" if why else "") + f" (log: logs/{name}.log)")
            return sock.exists()

        wait_until(ready, 20, f"{name}'s control socket")
        control = NodeControl(sock)
        self.nodes[name] = control
        return control

    def _security_args(self, credentials: Path | None) -> list[str]:
        assert self.caps is not None and self.run_dir is not None
        return ["--ipsec", self.caps.ipsec_backend, "--esp-sa", str(self.run_dir / "esp_sa"),
                "--credentials", str(credentials or DEFAULT_CREDENTIALS)]

    def start_proxy(self, mode: str = "ipsec-m2ms", config: Path | None = None,
                    t1: float = 0.1, credentials: Path | None = None,
                    notify: bool = False) -> NodeControl:
        return self.start_node("proxy", "nodes.proxy", "proxy", [
            "--listen", address("proxy", "core"), "--mode", mode, "--t1", str(t1),
            "--config", str(config or DEFAULT_CONFIG), "--log-level", "INFO",
            *(["--notify"] if notify else []), *self._security_args(credentials)])

    def start_servers(self, mode: str = "ipsec-m2ms", config: Path | None = None,
                      t1: float = 0.1) -> None:
        """The SMS and presence (each on its own host), then the proxy that informs them."""
        assert self.caps is not None and self.run_dir is not None
        for name in ("sms", "presence"):
            self.start_node(name, f"nodes.{name}", name, [
                "--mode", mode, "--t1", str(t1), "--config", str(config or DEFAULT_CONFIG),
                "--ipsec", self.caps.ipsec_backend, "--esp-sa", str(self.run_dir / "esp_sa"),
                "--log-level", "INFO"])
        self.start_proxy(mode, config, t1, notify=True)

    def start_terminal(self, name: str, mode: str = "ipsec-m2ms", config: Path | None = None,
                       t1: float = 0.1, credentials: Path | None = None,
                       media_once: bool = False, auto_switch: str = "off",
                       media_timeout: float = 0.3) -> NodeControl:
        assert self.run_dir is not None
        media = self.run_dir / "media"
        media.mkdir(exist_ok=True)
        primary = M2M_HOSTS[name][0][0]
        return self.start_node(name, "nodes.terminal", name, [
            "--name", name, "--local", address(name, primary),
            "--proxy", address("proxy", "core"), "--mode", mode, "--t1", str(t1),
            "--config", str(config or DEFAULT_CONFIG), "--log-level", "INFO",
            "--media-dir", str(media), *(["--media-once"] if media_once else []),
            *[arg for net, _ in M2M_HOSTS[name]
              for arg in ("--iface", f"{name}-{net}={address(name, net)}")],
            "--auto-switch", auto_switch, "--media-timeout", str(media_timeout),
            *self._security_args(credentials)])

    def set_access_delay(self, rtt_ms: float) -> None:
        """Give every access network (wlan, lte, netb) a round-trip time of `rtt_ms`: netem
        on both ends of each access link, half the RTT each way. Needs netem."""
        assert self.caps is not None
        if not self.caps.netem:
            raise RuntimeError("this kernel has no netem: access delay cannot be emulated")
        one_way = f"{rtt_ms / 2:g}ms"
        for host, ifaces in [*M2M_HOSTS.items(), ("r0", [(n, 1) for n in ACCESS_NETWORKS])]:
            for net, _ in ifaces:
                if net not in ACCESS_NETWORKS:
                    continue
                intf = f"{host}-{net}"
                cmd = (f"tc qdisc del dev {intf} root 2>/dev/null; " if rtt_ms == 0 else
                       f"tc qdisc replace dev {intf} root netem delay {one_way}")
                out = self.host(host).cmd(cmd)
                if rtt_ms and out.strip():
                    raise RuntimeError(f"netem on {host}/{intf} failed: {out.strip()}")
        self.say(f"access networks: RTT {rtt_ms:g} ms (netem)")

    def start_probe(self, rate: float = 50.0) -> tuple[Path, Path]:
        """A1 → B1 probe streams over both of A1's paths; returns (A1 log, B1 log)."""
        assert self.run_dir is not None
        b1_log = self.run_dir / "events" / "probe-b1.jsonl"
        a1_log = self.run_dir / "events" / "probe-a1.jsonl"
        self.popen("b1", [python(), "-m", "nodes.probe", "echo", "--port", str(PROBE_PORT),
                          "--node", "b1", "--log", str(b1_log)], name="probe-b1")
        wait_until(lambda: b1_log.exists() and b1_log.stat().st_size > 0, 20, "the probe echo")
        self.popen("a1", [python(), "-m", "nodes.probe", "send",
                          "--to", f"{address('b1', 'netb')}:{PROBE_PORT}",
                          "--path", f"wlan={address('a1', 'wlan')}",
                          "--path", f"lte={address('a1', 'lte')}",
                          "--rate", str(rate), "--node", "a1", "--log", str(a1_log)],
                   name="probe-a1")
        return a1_log, b1_log

    # -- bookkeeping ------------------------------------------------------------------------------
    def _delete_leftover_bridges(self) -> None:
        """net.stop() deletes our bridges; if it died half-way, delete the ones we made."""
        delete_bridges(self._created_bridges)

    def _check_captures(self) -> None:
        """A pcap that misses packets tcpdump received would skew the analysis: say which, in
        the console and the manifest."""
        if self.run_dir is None:  # stopped before its run folder was made
            return
        for intf in self.pcaps:
            log = self.run_dir / "logs" / f"tcpdump-{intf}.log"
            short = capture_shortfall(log.read_text(errors="replace")) if log.exists() else None
            if short is not None:
                self.incomplete_captures[intf] = short
                self.say(f"capture {intf} is incomplete: {short}")

    def _manifest(self, stopped: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "runner": {"pid": os.getpid(), "started": _start_time(os.getpid())},
            "bridges": self._created_bridges,
            "links": sorted(lab_link_names()) if self._created_bridges else [],
            "controller_pid": self._controller.popen.pid if self._controller else None,
            "processes": {p.name: p.popen.pid for p in self.procs},
            "stopped": stopped,
            "incomplete_captures": self.incomplete_captures,
        }

    def _write_json(self, name: str, data: Any) -> None:
        if self.run_dir is not None:
            (self.run_dir / name).write_text(json.dumps(data, indent=2) + "\n")

    def say(self, text: str) -> None:
        print(f"[lab {time.strftime('%H:%M:%S')}] {text}", flush=True)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines log; a torn last line (process killed mid-write) is skipped."""
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            with contextlib.suppress(ValueError):
                yield json.loads(line)
