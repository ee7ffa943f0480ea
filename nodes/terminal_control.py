"""The terminal's control commands: what the runner can ask of it over its control socket.

Each command is a method of the terminal or of one of its agents; the reply is its JSON
result (`help` lists the commands with their parameters):

    register      [expires, via, body]       REGISTER with the proxy (Fig 1); the status
    unregister                               REGISTER with Expires: 0
    call          to, [media]                INVITE; replies when answered or failed (Fig 2)
    hangup        call_id                    BYE
    message       to, text                   MESSAGE through the proxy
    switch        call_id, to, [media, method]   Fig 3: move the call to another terminal
    end           session                    end an anchored session (through the SMS)
    link_switch   via, [method]              Fig 4: move every session to interface `via`
    auto_switch   method, [media_timeout]    the Fig 4 method for carrier loss/media timeout
    send_smig     server, body               a hand-made SMIG body to the sms or presence
    export_keys   call_id                    a call's security information and keys
    status                                   registration, dialogs, counters
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nodes.control import ControlServer

if TYPE_CHECKING:
    from nodes.terminal import Terminal


def add_commands(control: ControlServer, term: Terminal) -> None:
    """Register the terminal's commands with its control server."""
    control.command("register", term.register,
                    optional={"expires": int, "via": str, "body": str},
                    help="REGISTER with the proxy (through interface via, with a body)")
    control.command("unregister", term.unregister, help="REGISTER with Expires: 0")
    control.command("call", term.call, required={"to": str}, optional={"media": str},
                    help="INVITE a terminal (media: audio or video)")
    control.command("hangup", term.hangup, required={"call_id": str}, help="BYE")
    control.command("message", term.message, required={"to": str, "text": str},
                    help="MESSAGE a terminal")
    control.command("switch", term.smig.switch, required={"call_id": str, "to": str},
                    optional={"media": str, "method": str},
                    help="Fig 3: move the call to terminal `to` (method reuse|renegotiate)")
    control.command("end", term.smig.end, required={"session": str},
                    help="end an anchored session everywhere (through the SMS)")
    control.command("link_switch", term.linkswitch.switch, required={"via": str},
                    optional={"method": str},
                    help="Fig 4: move every session to interface `via` "
                    "(method proposed | register-then-switch | reinvite)")
    control.command("auto_switch", term.linkswitch.set_auto, required={"method": str},
                    optional={"media_timeout": (float, int)},
                    help="switch links by this method on carrier loss or media timeout")
    control.command("send_smig", term.smig.send_raw, required={"server": str, "body": str},
                    help="send a hand-made SMIG body to the sms or presence")

    # Handlers are awaited: these two wrap synchronous methods.
    async def export(call_id: str) -> dict[str, Any]:
        return term.smig.export(call_id)

    control.command("export_keys", export, required={"call_id": str},
                    help="a call's security information and keys (lab tool)")

    async def status() -> dict[str, Any]:
        return term.status()

    control.command("status", status, help="registration, calls, counters")
