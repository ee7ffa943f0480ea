"""RTP media of a terminal: re-targetable voice/video senders and a logging receiver.

The public names of the media modules, and their command line:

* `VoiceSender`, `VideoSender` (`nodes.mediasend`) — PCMU speech and a video-like stream,
  paced against an absolute schedule, movable at run time with `retarget`;
* `Receiver` (`nodes.mediarecv`) — RTP and RTCP, every packet an event, loss and gap
  statistics, PCMU speech to a WAV by RTP timestamp;
* their sockets and addresses: `nodes.mediasock`.

Manual use (see `main`)::

    python -m nodes.media send --to 10.0.3.10:4000 [--local 10.0.1.10] [--video] --seconds 10
    python -m nodes.media recv --port 4000 --wav out.wav --log events.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from typing import Any

from nodes.events import EventLog
from nodes.mediarecv import Receiver
from nodes.mediasend import MAX_PAYLOAD, Sender, VideoSender, VoiceSender
from nodes.mediasock import Address, check_address
from nodes.speech import DEFAULT_SAMPLE

# Imported from here by the terminal's media sessions and the tests.
__all__ = ["MAX_PAYLOAD", "Receiver", "Sender", "VideoSender", "VoiceSender", "main"]


# --- command line -------------------------------------------------------------------------

def _hostport(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IPV4:PORT, got {text!r}")
    try:
        return check_address((host, int(port)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


async def _cli(args: argparse.Namespace, log: EventLog) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control = None
    if args.control:
        from nodes.control import ControlServer  # only the CLI needs it
        control = ControlServer(args.control, args.node)
    sender: Sender | None = None
    receiver: Receiver | None = None
    if args.mode == "send":
        common = {"log": log, "rtcp_interval": args.rtcp_interval}
        if args.video:
            sender = VideoSender(args.to, local_ip=args.local, local_port=args.local_port,
                                 bitrate=args.bitrate, log_packets=args.log_packets, **common)
        else:
            sender = VoiceSender(args.to, local_ip=args.local, local_port=args.local_port,
                                 sample=args.sample, loop=not args.once,
                                 log_packets=args.log_packets, **common)
        sender.start()
        ended = loop.create_task(sender.wait())
        ended.add_done_callback(lambda _: stop.set())
    else:
        receiver = Receiver(args.port, log=log, wav=args.wav, bind=args.bind,
                            log_packets=not args.quiet)
        receiver.start()
    if control is not None:
        await _control_commands(control, sender, receiver, stop)
        await control.start()
    try:
        await asyncio.wait_for(stop.wait(), args.seconds or None)
    except TimeoutError:
        pass
    finally:
        if control is not None:
            await control.close()
        if sender is not None:
            await sender.stop()
        if receiver is not None:
            receiver.close()


async def _control_commands(control: Any, sender: Sender | None, receiver: Receiver | None,
                            stop: asyncio.Event) -> None:
    from nodes.control import CommandError

    async def retarget(to: str, local: str | None = None) -> dict[str, Any]:
        assert sender is not None
        try:
            sender.retarget(_hostport(to), local)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise CommandError(str(exc)) from None
        return sender.state()

    async def status() -> dict[str, Any]:
        if sender is not None:
            return sender.state()
        assert receiver is not None
        return receiver.status()

    async def stop_cmd() -> str:
        stop.set()
        return "stopping"

    control.command("status", status, help="sender state or receiver statistics")
    control.command("stop", stop_cmd, help="stop and exit")
    if sender is not None:
        control.command("retarget", retarget, {"to": str}, {"local": str},
                        help="send to IPV4:PORT from local address (continuing seq/ts)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.media",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    send = sub.add_parser("send", help="send voice (PCMU) or video-like RTP")
    send.add_argument("--to", type=_hostport, required=True, help="IPV4:PORT of the receiver")
    send.add_argument("--local", help="local IPv4 address to send from (default: any)")
    send.add_argument("--local-port", type=int, default=0)
    send.add_argument("--video", action="store_true", help="video-like stream (PT 96)")
    send.add_argument("--bitrate", type=int, default=300_000, help="video bit/s")
    send.add_argument("--sample", default=str(DEFAULT_SAMPLE), help="8 kHz mono 16-bit WAV")
    send.add_argument("--once", action="store_true", help="voice: stop at the sample's end")
    send.add_argument("--log-packets", action="store_true", help="log every sent packet")
    send.add_argument("--rtcp-interval", type=float, default=5.0, help="SR period, 0 = off")
    recv = sub.add_parser("recv", help="receive, log every packet, write PCMU to a WAV")
    recv.add_argument("--port", type=int, required=True)
    recv.add_argument("--bind", default="0.0.0.0")
    recv.add_argument("--wav", help="write received PCMU speech here")
    recv.add_argument("--quiet", action="store_true", help="no per-packet events")
    for p in (send, recv):
        p.add_argument("--log", help="JSON-lines event log (default: stdout)")
        p.add_argument("--seconds", type=float, default=0, help="stop after this long")
        p.add_argument("--node", default=socket.gethostname(), help="node name in the log")
        p.add_argument("--control", help="Unix socket for retarget/status/stop commands")
    args = parser.parse_args(argv)
    log = EventLog(args.node, args.log)
    try:
        asyncio.run(_cli(args, log))
    except ValueError as exc:  # bad address, port in use, unreadable sample
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
