"""`make bench`: REGISTER/s and call set-ups/s of smig-lab's proxy, beside Kamailio's REGISTER/s.

Everything runs on loopback (127.0.0.x), in one run:

1. REGISTER/s through the real proxy code path: `python -m nodes.proxy --mode open` (the
   explicitly labelled no-IPsec mode; events logged to a file as in the lab), pinned to core 0
   with `taskset`, so the figure is one core's. SIPp runs pinned to core 1.
2. Call set-ups/s through the proxy: SIPp UAC → proxy → SIPp UAS, INVITE/100/180/200/ACK and
   then BYE/200 (one "call" = both transactions and the ACK; the UAC and UAS are registered
   first from the ports they then use, as the proxy drops requests from unregistered sources).
3. The same REGISTER load against Kamailio 5.6 as a minimal in-memory registrar
   (bench/kamailio.cfg: one UDP worker, usrloc without a database, accepts any REGISTER),
   also pinned to core 0, started with its own config in a temporary run directory and
   stopped afterwards.

Method (closed loop, fixed count): SIPp keeps `--window` calls in flight (`-users W`): a new
REGISTER (or call) starts as soon as one ends, until `--registers` (`--calls`) have been
made. The reported rate is SIPp's own count of successful calls divided by the time from
its start to its final statistics row (`-trace_stat`). A closed loop measures what the
server sustains: an open-loop rate above capacity only overflows socket buffers and measures
retransmission collapse. The failure count is printed beside each rate; a rate with
failures is flagged, since it is not a sustained 0-failure figure. REGISTERs cycle over
`--aors` distinct AORs (t0000...), so most are refreshes of existing bindings, as in a
deployment. The proxy keeps each completed REGISTER transaction for Timer J (32 s) to
absorb retransmissions, as its response octets only: they pile up through a run shorter
than that, which costs little (compare `--registers 200000`, past Timer J). No timing is
asserted anywhere: this prints figures, it does not test them.

    .venv/bin/python bench/run.py [--registers 60000] [--calls 5000] [--window 100]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sipp import (
    DOMAIN,
    ROOT,
    ProxyProcess,
    SippResult,
    bench_config,
    free_port,
    register_from,
    run_sipp,
    start_sipp,
    stop_process,
    terminal_names,
    wait_udp_bound,
    write_inf,
)

TARGET_REGISTER_PER_S = 5000
KAMAILIO_CFG = ROOT / "bench" / "kamailio.cfg"
KAMAILIO_MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")
SERVER_CPU, LOAD_CPU = 0, 1
PROXY_IP, UAC_IP, UAS_IP = "127.0.0.1", "127.0.0.2", "127.0.0.3"


@dataclass
class Row:
    what: str
    server: str
    result: SippResult | None
    note: str = ""


def register_load(target: str, workdir: Path, args: argparse.Namespace, count: int,
                  tag: str) -> SippResult:
    inf = write_inf(workdir / f"aors-{tag}.csv", [(n, DOMAIN) for n in terminal_names(args.aors)])
    return run_sipp("register.xml", target, UAC_IP, free_port(UAC_IP), workdir, inf=inf,
                    count=count, users=args.window, cpu=LOAD_CPU, timeout_s=args.max_seconds,
                    wall_timeout=args.max_seconds + 30)


def bench_proxy(workdir: Path, args: argparse.Namespace) -> list[Row]:
    config = workdir / "bench.json"
    bench_config(config, args.aors, extra=("uac", "uas"))
    proxy = ProxyProcess(config, PROXY_IP, workdir, cpu=SERVER_CPU)
    rows: list[Row] = []
    try:
        reg = register_load(proxy.addr, workdir, args, args.registers, "proxy")
        rows.append(Row("REGISTER/s", "smig-lab proxy", reg))
        uac_port, uas_port = free_port(UAC_IP), free_port(UAS_IP)
        register_from(proxy.addr, "uac", UAC_IP, uac_port, workdir)
        register_from(proxy.addr, "uas", UAS_IP, uas_port, workdir)
        uas = start_sipp("uas_call.xml", UAS_IP, uas_port, workdir, cpu=LOAD_CPU,
                         timeout_s=args.max_seconds + 10)
        try:
            inf = write_inf(workdir / "call.csv", [("uac", "uas", DOMAIN)])
            calls = run_sipp("uac_call.xml", proxy.addr, UAC_IP, uac_port, workdir, inf=inf,
                             count=args.calls, users=args.window, cpu=LOAD_CPU,
                             timeout_s=args.max_seconds, wall_timeout=args.max_seconds + 30)
        finally:
            stop_process(uas)
        rows.append(Row("call set-ups/s", "smig-lab proxy", calls,
                        "INVITE..ACK + BYE, UAC->proxy->UAS"))
        counters = proxy.status()["counters"]
        print("proxy counters (what it received, forwarded, answered and dropped):")
        print(textwrap.fill(", ".join(f"{k} {v:,}" for k, v in sorted(counters.items())), 96,
                            initial_indent="  ", subsequent_indent="  "))
    finally:
        proxy.stop()
    return rows


def bench_kamailio(workdir: Path, args: argparse.Namespace) -> Row:
    if shutil.which("kamailio") is None:
        return Row("REGISTER/s", "Kamailio", None, "kamailio not installed (make setup)")
    run_dir = workdir / "kamailio"
    run_dir.mkdir()
    port = free_port(PROXY_IP)
    cmd = ["kamailio", "-f", str(KAMAILIO_CFG), "-DD", "-E", "-n", "1",
           "-l", f"udp:{PROXY_IP}:{port}", "-P", str(run_dir / "kamailio.pid"),
           "-Y", str(run_dir), "-m", "128", "-M", "16"]
    if KAMAILIO_MODULES.is_dir():
        cmd += ["-L", str(KAMAILIO_MODULES)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(SERVER_CPU), *cmd]
    with (run_dir / "kamailio.out").open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=run_dir)
    try:
        wait_udp_bound(PROXY_IP, port, proc)
        # Its worker is forked after the socket is bound: one REGISTER answered = ready.
        register_from(f"{PROXY_IP}:{port}", "ready", UAC_IP, free_port(UAC_IP), workdir)
        result = register_load(f"{PROXY_IP}:{port}", workdir, args, args.kamailio_registers,
                               "kamailio")
    finally:
        stop_process(proc)
    return Row("REGISTER/s", "Kamailio 5.6 (1 worker)", result)


def _fmt(result: SippResult | None) -> tuple[str, str, str]:
    if result is None:
        return "-", "-", "-"
    flag = "" if result.ok else " (!)"
    return f"{result.rate:,.0f}{flag}", f"{result.successful:,}", f"{result.failed:,}"


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print()
    print(f"Closed loop, {args.window} in flight, server on core {SERVER_CPU}, "
          f"SIPp on core {LOAD_CPU}, loopback UDP:")
    print(f"  {'measure':<16} {'server':<26} {'rate (SIPp)':>12} {'ok':>9} {'failed':>7}  note")
    for row in rows:
        rate, ok, failed = _fmt(row.result)
        print(f"  {row.what:<16} {row.server:<26} {rate:>12} {ok:>9} {failed:>7}  {row.note}")
    ours = next((r.result for r in rows if r.server == "smig-lab proxy"
                 and r.what == "REGISTER/s"), None)
    kam = next((r.result for r in rows if r.server.startswith("Kamailio")), None)
    print()
    if ours is not None and kam is not None and kam.rate > 0:
        print(f"  REGISTER/s ratio smig-lab/Kamailio: {ours.rate / kam.rate:.2f}")
    if ours is not None:
        verdict = "meets" if ours.ok and ours.rate >= TARGET_REGISTER_PER_S else "below"
        print(f"  target >= {TARGET_REGISTER_PER_S:,} REGISTER/s on one core: {verdict} "
              f"({ours.rate:,.0f}/s, {ours.failed} failed)")
    if any(r.result is not None and not r.result.ok for r in rows):
        print("  (!) run had failures or a non-zero SIPp exit: not a 0-failure figure")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--registers", type=int, default=60000,
                        help="REGISTERs against the proxy")
    parser.add_argument("--kamailio-registers", type=int, default=100000,
                        help="REGISTERs against Kamailio (more: it is faster)")
    parser.add_argument("--calls", type=int, default=5000, help="calls through the proxy")
    parser.add_argument("--window", type=int, default=100, help="calls SIPp keeps in flight")
    parser.add_argument("--aors", type=int, default=1000, help="distinct AORs registered")
    parser.add_argument("--max-seconds", type=int, default=120,
                        help="bound on each SIPp run (it then fails)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    for name in ("registers", "kamailio_registers", "calls", "window", "aors"):
        if not 1 <= getattr(args, name) <= 1_000_000:
            parser.error(f"--{name.replace('_', '-')} must be 1..1000000")
    if shutil.which("sipp") is None:
        print("bench: SIPp is not installed (Debian sip-tester; run make setup)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="smig-bench-"))
    try:
        rows = bench_proxy(workdir, args)
        rows.append(bench_kamailio(workdir, args))
        report(rows, args)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
