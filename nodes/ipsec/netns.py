"""Running a piece of code inside another network namespace from this process."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def netns_path(netns: str | None) -> str | None:
    """A namespace name (under /run/netns) or a path like /proc/PID/ns/net; None: ours."""
    if netns is None:
        return None
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` in a short-lived thread that has joined `netns` (setns is per thread), so the
    sockets and devices it creates live there while this process stays where it is."""
    path = netns_path(netns)
    if path is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({path}) failed")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
