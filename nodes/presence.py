"""Presence server: knows each user's terminals, their capabilities and registration state.

The proxy tells it about registrations; a terminal asks `presence-query` (user, capability)
and gets a `presence-result` MESSAGE back (RFC 3428 forbids a body in the 200). A terminal
may ask about its own user or a friend's, nobody else's.

    python -m nodes.presence --config config/lab.json --events ... --control ...
"""

from __future__ import annotations

import sys
from typing import Any

from nodes import smig
from nodes.server import SmigServer, server_main
from nodes.sip.transaction import ServerTransaction


class Presence(SmigServer):
    name = "presence"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.registered: dict[str, str] = {}  # terminal -> address

    async def handle(self, msg: smig.Smig, sender: str, tx: ServerTransaction) -> None:
        """Every check before any change: a refused request changes nothing."""
        if isinstance(msg, smig.Registration):
            if sender != "proxy":
                return self._refuse(tx, msg, sender, 403, "Only the proxy reports registrations")
            if msg.terminal not in self.config.terminals:
                return self._refuse(tx, msg, sender, 400, "Unknown terminal")
            if msg.registered and msg.address:
                self.registered[msg.terminal] = msg.address
            else:
                self.registered.pop(msg.terminal, None)
            self.events.emit("presence-update", terminal=msg.terminal,
                             registered=msg.registered)
            tx.reply(200)
        elif isinstance(msg, smig.PresenceQuery):
            asker = self.config.terminals.get(sender)
            if msg.user not in self.config.users:
                return self._refuse(tx, msg, sender, 404, "Unknown user")
            if asker is None or not (asker.user == msg.user or frozenset(
                    (asker.user, msg.user)) in self.config.friends):
                return self._refuse(tx, msg, sender, 403, "Not your user or a friend's")
            tx.reply(200)
            result = smig.PresenceResult(msg.session, msg.user, self.lookup(msg.user))
            self.events.emit("presence-answer", to=sender, user=msg.user,
                             capability=msg.capability)
            self.send(sender, result)
        else:
            self._refuse(tx, msg, sender, 400, f"Presence does not take {msg.TYPE}")

    def _refuse(self, tx: ServerTransaction, msg: smig.Smig, sender: str, status: int,
                reason: str) -> None:
        self.counters[f"refused-{status}"] += 1
        self.events.emit("refused", type=msg.TYPE, session=msg.session, sender=sender,
                         status=status, reason=reason)
        tx.reply(status, reason)

    def lookup(self, user: str) -> list[dict[str, Any]]:
        out = []
        for name in self.config.users[user]:
            term = self.config.terminals[name]
            out.append({"terminal": name, "capabilities": list(term.capabilities),
                        "registered": name in self.registered,
                        "address": self.registered.get(name)})
        return out

    def status(self) -> dict[str, Any]:
        return {**super().status(), "registered": dict(self.registered)}


if __name__ == "__main__":
    sys.exit(server_main(Presence))
