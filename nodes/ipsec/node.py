"""A node's IPsec: the backend the probe chose, the run's opt-in `esp_sa` file, and a record
of what this node installed, so that it can report it and remove all of it on exit.

    ipsec = NodeIpsec.create("userspace", esp_sa_path=run / "esp_sa", node="a1")
    ipsec.install(sas, policies)      # all or nothing
    ipsec.remove(sas, policies)       # what is already gone is not an error
    ipsec.close()                     # everything this node installed
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from nodes.ipsec.api import IPsecBackend, IPsecError, Policy, SecurityAssociation, Selector
from nodes.ipsec.esp_sa import EspSaFile

log = logging.getLogger("ipsec")


def make_backend(name: str) -> IPsecBackend:
    """A started backend of the given kind, in the current network namespace."""
    if name == "kernel":
        from nodes.ipsec.kernel import KernelBackend

        return KernelBackend().start()
    if name == "userspace":
        from nodes.ipsec.userspace import UserspaceBackend

        backend = UserspaceBackend()
        backend.start()
        return backend
    raise ValueError(f"unknown IPsec backend {name!r} (expected kernel or userspace)")


class NodeIpsec:
    def __init__(self, backend: IPsecBackend, backend_name: str, node: str,
                 esp_sa_path: str | os.PathLike[str] | None = None) -> None:
        self.backend = backend
        self.backend_name = backend_name
        self.node = node
        self._esp_sa = EspSaFile(esp_sa_path) if esp_sa_path else None
        self._sas: dict[tuple[str, int], SecurityAssociation] = {}
        self._policies: dict[tuple[Selector, str], Policy] = {}

    @classmethod
    def create(cls, backend_name: str, node: str,
               esp_sa_path: str | os.PathLike[str] | None = None) -> NodeIpsec:
        ipsec = cls(make_backend(backend_name), backend_name, node, esp_sa_path)
        log.info("%s: IPsec backend %s", node, backend_name)
        return ipsec

    # -- install / remove --------------------------------------------------------------------
    def install(self, sas: Iterable[SecurityAssociation], policies: Iterable[Policy]) -> None:
        """Add SAs, then policies; on any failure remove what this call added and re-raise."""
        added_sas: list[SecurityAssociation] = []
        added_pols: list[Policy] = []
        try:
            for sa in sas:
                self.backend.add_sa(sa)
                added_sas.append(sa)
                self._sas[(sa.dst, sa.spi)] = sa
                if self._esp_sa is not None:
                    self._esp_sa.add(sa)
            self._add_policies(list(policies), added_pols)
        except Exception:
            # Only what this call added: a policy refused as a duplicate is someone else's.
            self.remove(added_sas, added_pols)
            raise

    def remove(self, sas: Iterable[SecurityAssociation], policies: Iterable[Policy]) -> None:
        """Policies first (no packet may match a policy whose SA is gone), then SAs."""
        pols = list(policies)
        batch = getattr(self.backend, "delete_policies", None)
        if batch is not None and pols:
            self._try(batch, [(p.selector, p.direction) for p in pols])
        else:
            for pol in pols:
                self._try(self.backend.delete_policy, pol.selector, pol.direction)
        for pol in pols:
            self._policies.pop((pol.selector, pol.direction.value), None)
        for sa in sas:
            self._try(self.backend.delete_sa, sa.dst, sa.spi)
            self._sas.pop((sa.dst, sa.spi), None)

    def add_policies(self, policies: Iterable[Policy]) -> None:
        """All or nothing, like install()."""
        added: list[Policy] = []
        try:
            self._add_policies(list(policies), added)
        except Exception:
            self.remove([], added)
            raise

    def _add_policies(self, pols: list[Policy], added: list[Policy]) -> None:
        """All at once where the backend can (the userspace engine: one nft update, all or
        nothing), else one by one; `added` collects what went in, for the caller's rollback."""
        batch = getattr(self.backend, "add_policies", None)
        steps = [pols] if batch is not None and len(pols) > 1 else [[p] for p in pols]
        for step in steps:
            if len(step) > 1:
                batch(step)
            else:
                self.backend.add_policy(step[0])
            for pol in step:
                self._policies[(pol.selector, pol.direction.value)] = pol
            added += step

    def update_policies(self, policies: Iterable[Policy]) -> None:
        """Point policies at new SAs, each replaced in one step (rekey, Fig 3 step 9)."""
        for pol in policies:
            self.backend.update_policy(pol)
            self._policies[(pol.selector, pol.direction.value)] = pol

    def move_sa(self, sa: SecurityAssociation, new_src: str, new_dst: str,
                selector: Selector | None) -> SecurityAssociation:
        """Same keys and SPI on new addresses (DESIGN §4: replacement)."""
        move = getattr(self.backend, "move_sa", None)
        if move is None:
            raise IPsecError(f"backend {self.backend_name} cannot move SAs")
        moved: SecurityAssociation = move(sa.dst, sa.spi, new_src, new_dst, selector)
        self._sas.pop((sa.dst, sa.spi), None)
        self._sas[(moved.dst, moved.spi)] = moved
        if self._esp_sa is not None:
            self._esp_sa.add(moved)
        return moved

    def _try(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except IPsecError as exc:  # already gone is fine; anything else is worth a line
            log.warning("%s: %s", self.node, exc)

    # -- reporting ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What is installed now, from the backend itself (no keys)."""
        return {
            "backend": self.backend_name,
            "sas": [{"spi": sa.spi, "src": sa.src, "dst": sa.dst,
                     "selector": _sel(sa.selector)} for sa in self.backend.list_sas()],
            "policies": [{"dir": p.direction.value, "selector": _sel(p.selector),
                          "spi": p.spi} for p in self.backend.list_policies()],
            "counters": self.backend.counters(),
        }

    def close(self) -> None:
        self.backend.close()
        self._sas.clear()
        self._policies.clear()


def _sel(sel: Selector | None) -> str | None:
    if sel is None:
        return None
    return f"{sel.src}:{sel.sport or '*'}->{sel.dst}:{sel.dport or '*'}/{sel.proto}"
