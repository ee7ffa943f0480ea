"""The IPsec API both backends implement (kernel XFRM and userspace ESP).

Transport-mode ESP only (DESIGN §2). Keys live in `SecurityAssociation` objects whose `repr`
masks them: keys never reach a log; only `esp_sa.EspSaFile` writes them, opt-in, for Wireshark.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field, replace

IPPROTO_UDP = 17
IPPROTO_ESP = 50

# Algorithm names as in DESIGN §2 (Security-Client `alg`/`ealg`), with their XFRM names.
ENC_ALGS = {"aes-cbc": "cbc(aes)", "null": "ecb(cipher_null)"}
AUTH_ALGS = {  # name: (XFRM name, ICV length in bytes)
    "hmac-sha-256-128": ("hmac(sha256)", 16),
    "hmac-sha-1-96": ("hmac(sha1)", 12),
}


class Direction(enum.Enum):
    IN = "in"
    OUT = "out"


ANY = "0.0.0.0"


@dataclass(frozen=True)
class Selector:
    """Which packets a policy or SA covers. Port 0 means any port; proto 0 means any;
    address 0.0.0.0 means any address (prefix length 0 in XFRM)."""

    src: str
    dst: str
    proto: int = IPPROTO_UDP
    sport: int = 0
    dport: int = 0

    def matches(self, src: str, dst: str, proto: int, sport: int, dport: int) -> bool:
        return (
            self.src in (ANY, src)
            and self.dst in (ANY, dst)
            and self.proto in (0, proto)
            and self.sport in (0, sport)
            and self.dport in (0, dport)
        )


@dataclass
class SecurityAssociation:
    """One transport-mode ESP SA. `spi` is chosen by the receiver (DESIGN §2)."""

    src: str
    dst: str
    spi: int
    enc_alg: str
    enc_key: bytes
    auth_alg: str
    auth_key: bytes
    selector: Selector | None = None
    replay_window: int = 32
    # Seconds until the kernel expires it; None = no limit (XFRM's 0). "Lifetime 0" in the paper
    # (Fig 3 step 9) is done by explicit deletion, not by this field.
    lifetime_seconds: int | None = None
    # Runtime state a backend reports back from get_sa()/list_sas().
    seq: int = 0
    replay_top: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.enc_alg not in ENC_ALGS:
            raise ValueError(f"unknown encryption algorithm {self.enc_alg!r}")
        if self.auth_alg not in AUTH_ALGS:
            raise ValueError(f"unknown integrity algorithm {self.auth_alg!r}")
        if not 0 < self.spi < 2**32 or self.spi < 256:
            raise ValueError(f"SPI {self.spi} out of range (256..2^32-1; 1-255 are reserved)")
        want = 16 if self.enc_alg == "aes-cbc" else 0
        if len(self.enc_key) != want:
            raise ValueError(f"{self.enc_alg} needs a {want}-byte key, got {len(self.enc_key)}")

    def __repr__(self) -> str:  # keys masked on purpose
        return (
            f"SecurityAssociation(spi=0x{self.spi:08x}, {self.src}->{self.dst}, "
            f"{self.enc_alg}/{self.auth_alg}, selector={self.selector}, keys=<hidden>)"
        )

    __str__ = __repr__

    def moved(self, src: str, dst: str, selector: Selector | None) -> SecurityAssociation:
        """The same keys and SPI on new addresses (DESIGN §4: replacement, not migrate)."""
        return replace(self, src=src, dst=dst, selector=selector)


@dataclass(frozen=True)
class Policy:
    """An SPD entry: packets matching `selector` in `direction` must use ESP to/from the
    template addresses (`tmpl_src`, `tmpl_dst`), optionally pinned to one SPI."""

    selector: Selector
    direction: Direction
    tmpl_src: str
    tmpl_dst: str
    spi: int | None = None
    priority: int = 1000


class IPsecError(RuntimeError):
    """A backend operation failed (message says which SA/policy and why)."""


class IPsecBackend(abc.ABC):
    """SPD/SAD of one network namespace. Every backend removes what it installed in `close()`."""

    name: str = "abstract"

    @abc.abstractmethod
    def add_sa(self, sa: SecurityAssociation) -> None: ...

    @abc.abstractmethod
    def update_sa(self, sa: SecurityAssociation) -> None: ...

    @abc.abstractmethod
    def get_sa(self, dst: str, spi: int) -> SecurityAssociation | None: ...

    @abc.abstractmethod
    def delete_sa(self, dst: str, spi: int) -> None:
        """Delete; an SA that is already gone is not an error."""

    @abc.abstractmethod
    def list_sas(self) -> list[SecurityAssociation]: ...

    @abc.abstractmethod
    def add_policy(self, policy: Policy) -> None: ...

    def update_policy(self, policy: Policy) -> None:
        """Replace the policy with the same selector and direction in one step (e.g. point an
        OUT policy at a new SA during a rekey) so no packet slips out unprotected between.
        Backends override this with an atomic operation."""
        self.delete_policy(policy.selector, policy.direction)
        self.add_policy(policy)

    @abc.abstractmethod
    def delete_policy(self, selector: Selector, direction: Direction) -> None:
        """Delete; a policy that is already gone is not an error."""

    @abc.abstractmethod
    def list_policies(self) -> list[Policy]: ...

    @abc.abstractmethod
    def counters(self) -> dict[str, int]:
        """At least: integrity_failed, replay_dropped, no_sa, policy_dropped, packets_in,
        packets_out."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Remove every SA and policy this instance installed (and nothing else)."""

    def close(self) -> None:
        self.flush()
