"""tshark on a run's capture with its ESP decrypted: the run's esp_sa rows become tshark
options, the rest of the command line goes to tshark as it is.

    python -m experiments.decrypt captures/<run>/pcaps/proxy-core.pcap -Y sip
    python -m experiments.decrypt captures/<run>/pcaps/b1-netb.pcap -Y rtp | head
    python -m experiments.decrypt captures/<run>/pcaps/proxy-core.pcap --print-options

The esp_sa file is the pcap's run folder's (captures/<run>/esp_sa) unless --esp-sa names
another. RTP inside ESP is found through the SDP of the call; the media of terminals a Fig 3
switch brought in (configured by SMIG, not SDP) is decoded on the SMS's media ports; other
ports with `-d udp.port==N,rtp`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from pathlib import Path

from nodes.ipsec.esp_sa import tshark_args
from nodes.sms import SMIG_PORTS


def esp_sa_for(pcap: Path) -> Path:
    """captures/<run>/pcaps/X.pcap -> captures/<run>/esp_sa."""
    return pcap.resolve().parent.parent / "esp_sa"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.decrypt", description=__doc__,
        usage="%(prog)s PCAP [--esp-sa ESP_SA] [--print-options] [TSHARK_ARG ...]",
        epilog="Every other argument (TSHARK_ARG: -Y FILTER, -V, -T fields -e ..., -d ...) "
               "goes to tshark as it is.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pcap", type=Path, help="a capture of a run (captures/<run>/pcaps/*.pcap)")
    ap.add_argument("--esp-sa", type=Path, help="the esp_sa file (default: the run's)")
    ap.add_argument("--print-options", action="store_true",
                    help="print the tshark options instead of running tshark")
    args, tshark_rest = ap.parse_known_args(argv)
    esp_sa = args.esp_sa or esp_sa_for(args.pcap)
    if not args.pcap.is_file():
        ap.error(f"no such capture: {args.pcap}")
    if not esp_sa.is_file():
        ap.error(f"no esp_sa file at {esp_sa} (a run writes it when its nodes install SAs; "
                 f"--esp-sa names another)")
    options = tshark_args(esp_sa)
    if args.print_options:
        with contextlib.suppress(BrokenPipeError):
            print(shlex.join(options))
        return 0
    tshark = shutil.which("tshark")
    if tshark is None:
        ap.error("tshark is not installed (make setup installs it)")
    sys.stdout.flush()
    smig_media = [a for port in SMIG_PORTS.values() for a in ("-d", f"udp.port=={port},rtp")]
    os.execv(tshark, [tshark, "-n", "-r", str(args.pcap), *options, *smig_media, *tshark_rest])


if __name__ == "__main__":
    sys.exit(main())
