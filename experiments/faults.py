"""Client for the controller's fault-injection REST API (see `nodes.controller`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class ControllerError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"controller answered {status}: {message}")
        self.status = status
        self.message = message


class FaultClient:
    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        """One REST call; 4xx/5xx become ControllerError with the server's error text."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text.strip() or exc.reason
            raise ControllerError(exc.code, message) from None

    def switches(self) -> list[dict[str, Any]]:
        return self.request("GET", "/lab/switches")["switches"]

    def faults(self) -> list[dict[str, Any]]:
        return self.request("GET", "/lab/faults")["faults"]

    def inject(self, switch: str, port: str | int, kind: str) -> dict[str, Any]:
        """Inject `kind` ("down" or "blackhole") on a switch port; returns the fault record."""
        return self.request("POST", "/lab/faults", {"switch": switch, "port": port, "kind": kind})[
            "fault"
        ]

    def restore(self, fault_id: int) -> dict[str, Any]:
        return self.request("DELETE", f"/lab/faults/{fault_id}")["restored"]

    def restore_all(self) -> list[dict[str, Any]]:
        return self.request("DELETE", "/lab/faults")["restored"]
