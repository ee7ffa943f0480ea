"""NETLINK_XFRM (the Linux SAD/SPD) messages in pyroute2's idiom, and `XfrmSocket`.

pyroute2 0.9 knows the family number (`NETLINK_XFRM`) but has no XFRM SA/policy messages, so
they are declared here the way pyroute2 declares rtnetlink ones: `nlmsg` classes with `fields`
and a shared `nla_map`. Nested C structs (`xfrm_selector`, `xfrm_id`, ...) are field *types*
(`XfrmStruct`, pyroute2's `decode_from`/`encode_into` protocol) whose values are dicts.

Layouts follow include/uapi/linux/xfrm.h for 64-bit Linux (native byte order; `__be16`/`__be32`
fields big-endian). pyroute2 packs fields one by one without C alignment, so the compiler's
padding is spelled out as `__pad*` fields; tests check every `sizeof` and offset against ctypes.
Keys are `SecretBytes`, whose repr is masked, so a decoded message never shows them in a log.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
from typing import Any, ClassVar

from pyroute2 import config as pyroute2_config
from pyroute2.netlink import (
    NETLINK_XFRM,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NotInitialized,
    nla,
    nlmsg,
    nlmsg_decoder_generic,
    nlmsg_encoder_generic,
)
from pyroute2.netlink.marshal import Marshal
from pyroute2.netlink.nlsocket import AsyncNetlinkSocket, NetlinkSocket

# A socket in another namespace (netns=...) is made by a forked copy of this interpreter. Left
# with our handlers, a SIGTERM to that child (pyroute2 sends one when it is done) would run the
# parent's code in it — a lab's teardown, say. Children reset SIGTERM/SIGINT instead.
pyroute2_config.disable_mp_signal = True

# enum { XFRM_MSG_BASE = 0x10, ... } (only the ones used or received here)

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F
XFRM_MSG_REPORT = 0x20
XFRM_MSG_MIGRATE = 0x21
XFRM_MSG_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("XFRM_MSG_")}

XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
XFRM_POLICY_TYPE_MAIN = 0
XFRM_SHARE_ANY = 0
XFRM_INF = 2**64 - 1  # "no limit" in xfrm_lifetime_cfg

# Multicast groups: the legacy bit masks bind() takes (XFRMGRP_*) and the group numbers
# (enum xfrm_nlgroups, XFRMNLGRP_*) for NETLINK_ADD_MEMBERSHIP.
XFRMGRP_ACQUIRE = 1
XFRMGRP_EXPIRE = 2
XFRMGRP_SA = 4
XFRMGRP_POLICY = 8
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4

ADDR_LEN = 16


class SecretBytes(bytes):
    """Key material: behaves as bytes, prints masked."""

    def __repr__(self) -> str:
        return f"<{len(self)} secret bytes>"

    __str__ = __repr__


def pack_addr(address: str | bytes | int | None) -> bytes:
    """`xfrm_address_t` (a 16-byte union): IPv4 in the first 4 bytes, IPv6 in all 16."""
    if address in (None, 0, b"", ""):
        return bytes(ADDR_LEN)
    if isinstance(address, bytes):
        if len(address) > ADDR_LEN:
            raise ValueError(f"xfrm_address_t holds 16 bytes, got {len(address)}")
        return address.ljust(ADDR_LEN, b"\0")
    return ipaddress.ip_address(address).packed.ljust(ADDR_LEN, b"\0")


def unpack_addr(raw: bytes, family: int) -> str:
    """The text form of an `xfrm_address_t` (the union needs the family to be read)."""
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    raise ValueError(f"unknown address family {family}")


def family_of(address: str) -> int:
    return socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6


class xfrm_address_t:
    """Field type; value: bytes (decoded raw, 16 bytes), or str/bytes/None to encode.

    typedef union { __be32 a4; __be32 a6[4]; struct in6_addr in6; } xfrm_address_t;
    """

    size = ADDR_LEN

    @staticmethod
    def decode_from(data: bytes | bytearray, offset: int) -> tuple[bytes, int]:
        return bytes(data[offset : offset + ADDR_LEN]), offset + ADDR_LEN

    @staticmethod
    def encode_into(data: bytearray, offset: int, value: Any) -> int:
        data.extend(pack_addr(value))
        return offset + ADDR_LEN


def _default(fmt: Any) -> Any:
    return b"" if isinstance(fmt, str) and fmt.endswith("s") else 0


def _size(fields: tuple[tuple[str, Any], ...]) -> int:
    return sum(struct.calcsize(f) if isinstance(f, str) else f.size for _, f in fields)


class XfrmStruct:
    """A nested C struct as a pyroute2 field type: `fields` in, a dict out."""

    fields: ClassVar[tuple[tuple[str, Any], ...]] = ()
    size: ClassVar[int] = 0

    def __init_subclass__(cls) -> None:
        cls.size = _size(cls.fields)

    @classmethod
    def decode_from(cls, data: bytes | bytearray, offset: int) -> tuple[dict[str, Any], int]:
        value: dict[str, Any] = {}
        for name, fmt in cls.fields:
            if isinstance(fmt, str):
                item, offset = nlmsg_decoder_generic.decode_field(fmt, data, offset)
            else:
                item, offset = fmt.decode_from(data, offset)
            if not name.startswith("__"):
                value[name] = item
        return value, offset

    @classmethod
    def encode_into(cls, data: bytearray, offset: int, value: Any) -> int:
        value = value if isinstance(value, dict) else {}
        for name, fmt in cls.fields:
            item = value.get(name, _default(fmt))
            if isinstance(fmt, str):
                offset = nlmsg_encoder_generic.encode_field(fmt, data, offset, item)
            else:
                offset = fmt.encode_into(data, offset, item)
        return offset


class xfrm_selector(XfrmStruct):
    """struct xfrm_selector {
        xfrm_address_t daddr; xfrm_address_t saddr;
        __be16 dport; __be16 dport_mask; __be16 sport; __be16 sport_mask;
        __u16 family; __u8 prefixlen_d; __u8 prefixlen_s; __u8 proto;
        int ifindex; __kernel_uid32_t user;
    };  /* sizeof 56 */"""

    fields = (
        ("daddr", xfrm_address_t),
        ("saddr", xfrm_address_t),
        ("dport", ">H"),
        ("dport_mask", ">H"),
        ("sport", ">H"),
        ("sport_mask", ">H"),
        ("family", "H"),
        ("prefixlen_d", "B"),
        ("prefixlen_s", "B"),
        ("proto", "B"),
        ("__pad", "3x"),
        ("ifindex", "i"),
        ("user", "I"),
    )


class xfrm_id(XfrmStruct):
    """struct xfrm_id { xfrm_address_t daddr; __be32 spi; __u8 proto; };  /* sizeof 24 */"""

    fields = (("daddr", xfrm_address_t), ("spi", ">I"), ("proto", "B"), ("__pad", "3x"))


class xfrm_lifetime_cfg(XfrmStruct):
    """struct xfrm_lifetime_cfg {
        __u64 soft_byte_limit; __u64 hard_byte_limit;
        __u64 soft_packet_limit; __u64 hard_packet_limit;
        __u64 soft_add_expires_seconds; __u64 hard_add_expires_seconds;
        __u64 soft_use_expires_seconds; __u64 hard_use_expires_seconds;
    };  /* byte/packet limits: XFRM_INF = none; *_expires_seconds: 0 = never */"""

    fields = tuple(
        (name, "Q")
        for name in (
            "soft_byte_limit",
            "hard_byte_limit",
            "soft_packet_limit",
            "hard_packet_limit",
            "soft_add_expires_seconds",
            "hard_add_expires_seconds",
            "soft_use_expires_seconds",
            "hard_use_expires_seconds",
        )
    )


class xfrm_lifetime_cur(XfrmStruct):
    """struct xfrm_lifetime_cur { __u64 bytes; __u64 packets; __u64 add_time; __u64 use_time; };"""

    fields = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))


class xfrm_stats(XfrmStruct):
    """struct xfrm_stats { __u32 replay_window; __u32 replay; __u32 integrity_failed; };"""

    fields = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))


class xfrm_replay_state(XfrmStruct):
    """struct xfrm_replay_state { __u32 oseq; __u32 seq; __u32 bitmap; };"""

    fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))


class xfrm_user_tmpl(XfrmStruct):
    """struct xfrm_user_tmpl {
        struct xfrm_id id; __u16 family; xfrm_address_t saddr; __u32 reqid;
        __u8 mode; __u8 share; __u8 optional; __u32 aalgos; __u32 ealgos; __u32 calgos;
    };  /* sizeof 64 */"""

    fields = (
        ("id", xfrm_id),
        ("family", "H"),
        ("__pad1", "2x"),
        ("saddr", xfrm_address_t),
        ("reqid", "I"),
        ("mode", "B"),
        ("share", "B"),
        ("optional", "B"),
        ("__pad2", "x"),
        ("aalgos", "I"),
        ("ealgos", "I"),
        ("calgos", "I"),
    )


class xfrm_user_migrate(XfrmStruct):
    """struct xfrm_user_migrate {
        xfrm_address_t old_daddr; xfrm_address_t old_saddr;
        xfrm_address_t new_daddr; xfrm_address_t new_saddr;
        __u8 proto; __u8 mode; __u16 reserved; __u32 reqid; __u16 old_family; __u16 new_family;
    };  /* sizeof 76 */"""

    fields = (
        ("old_daddr", xfrm_address_t),
        ("old_saddr", xfrm_address_t),
        ("new_daddr", xfrm_address_t),
        ("new_saddr", xfrm_address_t),
        ("proto", "B"),
        ("mode", "B"),
        ("reserved", "H"),
        ("reqid", "I"),
        ("old_family", "H"),
        ("new_family", "H"),
    )


class _keyed_nla(nla):
    """An NLA whose last field is a key of `alg_key_len` bits (C flexible array)."""

    __slots__ = ()

    def ft_decode(self, offset: int) -> None:
        for name, fmt in self.fields[:-1]:
            self[name], offset = self.decode_field(fmt, self.data, offset)
        nbytes = (self["alg_key_len"] + 7) // 8
        self[self.fields[-1][0]] = SecretBytes(self.data[offset : offset + nbytes])
        self.pop("attrs", None)
        if self.get("value") is NotInitialized:
            del self["value"]


class _struct_array_nla(nla):
    """An NLA holding back-to-back structs with no inner headers; value: a list of dicts."""

    __slots__ = ()
    item: ClassVar[type[XfrmStruct]]

    def ft_encode(self, offset: int) -> tuple[int, int]:
        for item in self.getvalue() or ():
            offset = self.item.encode_into(self.data, offset, item)
        return offset, 0

    def ft_decode(self, offset: int) -> None:
        end = self.offset + self.length
        items = []
        while offset + self.item.size <= end:
            value, offset = self.item.decode_from(self.data, offset)
            items.append(value)
        self.value = items
        self["value"] = items
        self.pop("attrs", None)


class xfrm_msg(nlmsg):
    """Base of every XFRM message: the `enum xfrm_attr_type_t` attributes (XFRMA_*)."""

    __slots__ = ()
    prefix = "XFRMA_"
    nla_map = (
        ("XFRMA_UNSPEC", "none"),
        ("XFRMA_ALG_AUTH", "xfrm_algo"),
        ("XFRMA_ALG_CRYPT", "xfrm_algo"),
        ("XFRMA_ALG_COMP", "xfrm_algo"),
        ("XFRMA_ENCAP", "hex"),
        ("XFRMA_TMPL", "xfrm_user_tmpl_list"),
        ("XFRMA_SA", "hex"),
        ("XFRMA_POLICY", "hex"),
        ("XFRMA_SEC_CTX", "hex"),
        ("XFRMA_LTIME_VAL", "lifetime_cur"),
        ("XFRMA_REPLAY_VAL", "replay_state"),
        ("XFRMA_REPLAY_THRESH", "uint32"),
        ("XFRMA_ETIMER_THRESH", "uint32"),
        ("XFRMA_SRCADDR", "hex"),
        ("XFRMA_COADDR", "hex"),
        ("XFRMA_LASTUSED", "uint64"),
        ("XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        ("XFRMA_MIGRATE", "xfrm_user_migrate_list"),
        ("XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        ("XFRMA_KMADDRESS", "hex"),
        ("XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        ("XFRMA_MARK", "xfrm_mark"),
        ("XFRMA_TFCPAD", "uint32"),
        ("XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        ("XFRMA_SA_EXTRA_FLAGS", "uint32"),
        ("XFRMA_PROTO", "uint8"),
        ("XFRMA_ADDRESS_FILTER", "hex"),
        ("XFRMA_PAD", "none"),
        ("XFRMA_OFFLOAD_DEV", "hex"),
        ("XFRMA_SET_MARK", "uint32"),
        ("XFRMA_SET_MARK_MASK", "uint32"),
        ("XFRMA_IF_ID", "uint32"),
        ("XFRMA_MTIMER_THRESH", "uint32"),
    )

    class xfrm_algo(_keyed_nla):
        """struct xfrm_algo { char alg_name[64]; unsigned int alg_key_len; char alg_key[]; };
        alg_key_len is in bits."""

        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_key", "s"))

    class xfrm_algo_auth(_keyed_nla):
        """struct xfrm_algo_auth { char alg_name[64]; unsigned int alg_key_len;
        unsigned int alg_trunc_len; char alg_key[]; };  /* lengths in bits */"""

        __slots__ = ()
        fields = (
            ("alg_name", "64s"),
            ("alg_key_len", "I"),
            ("alg_trunc_len", "I"),
            ("alg_key", "s"),
        )

    class xfrm_algo_aead(_keyed_nla):
        """struct xfrm_algo_aead { char alg_name[64]; unsigned int alg_key_len;
        unsigned int alg_icv_len; char alg_key[]; };"""

        __slots__ = ()
        fields = (
            ("alg_name", "64s"),
            ("alg_key_len", "I"),
            ("alg_icv_len", "I"),
            ("alg_key", "s"),
        )

    class xfrm_user_tmpl_list(_struct_array_nla):
        """XFRMA_TMPL: one or more struct xfrm_user_tmpl."""

        __slots__ = ()
        item = xfrm_user_tmpl

    class xfrm_user_migrate_list(_struct_array_nla):
        """XFRMA_MIGRATE: one or more struct xfrm_user_migrate."""

        __slots__ = ()
        item = xfrm_user_migrate

    class lifetime_cur(nla):
        """XFRMA_LTIME_VAL: struct xfrm_lifetime_cur."""

        __slots__ = ()
        fields = xfrm_lifetime_cur.fields

    class replay_state(nla):
        """XFRMA_REPLAY_VAL: struct xfrm_replay_state { __u32 oseq; __u32 seq; __u32 bitmap; };"""

        __slots__ = ()
        fields = xfrm_replay_state.fields

    class xfrm_replay_state_esn(nla):
        """struct xfrm_replay_state_esn { unsigned int bmp_len; __u32 oseq; __u32 seq;
        __u32 oseq_hi; __u32 seq_hi; __u32 replay_window; __u32 bmp[]; };"""

        __slots__ = ()
        fields = (
            ("bmp_len", "I"),
            ("oseq", "I"),
            ("seq", "I"),
            ("oseq_hi", "I"),
            ("seq_hi", "I"),
            ("replay_window", "I"),
            ("bmp", "s"),
        )

        def ft_decode(self, offset: int) -> None:
            for name, fmt in self.fields[:-1]:
                self[name], offset = self.decode_field(fmt, self.data, offset)
            self["bmp"] = bytes(self.data[offset : offset + 4 * self["bmp_len"]])
            self.pop("attrs", None)
            if self.get("value") is NotInitialized:
                del self["value"]

    class xfrm_userpolicy_type(nla):
        """struct xfrm_userpolicy_type { __u8 type; __u16 reserved1; __u8 reserved2; };"""

        __slots__ = ()
        fields = (
            ("type", "B"),
            ("__pad", "x"),
            ("reserved1", "H"),
            ("reserved2", "B"),
            ("__pad2", "x"),
        )

    class xfrm_mark(nla):
        """struct xfrm_mark { __u32 v; __u32 m; };"""

        __slots__ = ()
        fields = (("v", "I"), ("m", "I"))


USERSA_INFO_FIELDS: tuple[tuple[str, Any], ...] = (
    ("sel", xfrm_selector),
    ("id", xfrm_id),
    ("saddr", xfrm_address_t),
    ("lft", xfrm_lifetime_cfg),
    ("curlft", xfrm_lifetime_cur),
    ("stats", xfrm_stats),
    ("seq", "I"),
    ("reqid", "I"),
    ("family", "H"),
    ("mode", "B"),
    ("replay_window", "B"),
    ("flags", "B"),
    ("__pad", "7x"),
)

USERPOLICY_INFO_FIELDS: tuple[tuple[str, Any], ...] = (
    ("sel", xfrm_selector),
    ("lft", xfrm_lifetime_cfg),
    ("curlft", xfrm_lifetime_cur),
    ("priority", "I"),
    ("index", "I"),
    ("dir", "B"),
    ("action", "B"),
    ("flags", "B"),
    ("share", "B"),
    ("__pad", "4x"),
)


class xfrm_usersa_info(xfrm_msg):
    """NEWSA/UPDSA request, GETSA reply, SA dump entry.

    struct xfrm_usersa_info {
        struct xfrm_selector sel; struct xfrm_id id; xfrm_address_t saddr;
        struct xfrm_lifetime_cfg lft; struct xfrm_lifetime_cur curlft; struct xfrm_stats stats;
        __u32 seq; __u32 reqid; __u16 family; __u8 mode; __u8 replay_window; __u8 flags;
    };  /* sizeof 224 */"""

    __slots__ = ()
    fields = USERSA_INFO_FIELDS


class xfrm_usersa_id(xfrm_msg):
    """GETSA/DELSA request.

    struct xfrm_usersa_id { xfrm_address_t daddr; __be32 spi; __u16 family; __u8 proto; };
    /* sizeof 24 */"""

    __slots__ = ()
    fields = (
        ("daddr", xfrm_address_t),
        ("spi", ">I"),
        ("family", "H"),
        ("proto", "B"),
        ("__pad", "x"),
    )


class xfrm_userpolicy_info(xfrm_msg):
    """NEWPOLICY/UPDPOLICY request, GETPOLICY reply, policy dump entry.

    struct xfrm_userpolicy_info {
        struct xfrm_selector sel; struct xfrm_lifetime_cfg lft; struct xfrm_lifetime_cur curlft;
        __u32 priority; __u32 index; __u8 dir; __u8 action; __u8 flags; __u8 share;
    };  /* sizeof 168 */"""

    __slots__ = ()
    fields = USERPOLICY_INFO_FIELDS


class xfrm_userpolicy_id(xfrm_msg):
    """GETPOLICY/DELPOLICY request.

    struct xfrm_userpolicy_id { struct xfrm_selector sel; __u32 index; __u8 dir; };
    /* sizeof 64 */"""

    __slots__ = ()
    fields = (("sel", xfrm_selector), ("index", "I"), ("dir", "B"), ("__pad", "3x"))


class xfrm_usersa_flush(xfrm_msg):
    """FLUSHSA request. struct xfrm_usersa_flush { __u8 proto; };  /* 0 = every protocol */"""

    __slots__ = ()
    fields = (("proto", "B"), ("__pad", "3x"))


class xfrm_user_expire(xfrm_msg):
    """EXPIRE notification (XFRMNLGRP_EXPIRE); the state's fields are flattened in.

    struct xfrm_user_expire { struct xfrm_usersa_info state; __u8 hard; };  /* sizeof 232 */"""

    __slots__ = ()
    fields = (*USERSA_INFO_FIELDS, ("hard", "B"), ("__pad2", "7x"))


class xfrm_user_polexpire(xfrm_msg):
    """POLEXPIRE notification.

    struct xfrm_user_polexpire { struct xfrm_userpolicy_info pol; __u8 hard; };"""

    __slots__ = ()
    fields = (*USERPOLICY_INFO_FIELDS, ("hard", "B"), ("__pad2", "7x"))


class xfrm_migrate(xfrm_msg):
    """MIGRATE request: struct xfrm_userpolicy_id + XFRMA_MIGRATE (xfrm_user_migrate list)."""

    __slots__ = ()
    fields = xfrm_userpolicy_id.fields


class xfrm_dump_req(xfrm_msg):
    """A dump request (GETSA/GETPOLICY with NLM_F_DUMP), or FLUSHPOLICY: no fixed part."""

    __slots__ = ()
    fields = ()


class MarshalXfrm(Marshal):
    """Incoming XFRM messages by type."""

    msg_map = {  # noqa: RUF012 (pyroute2 copies it per instance)
        XFRM_MSG_NEWSA: xfrm_usersa_info,
        XFRM_MSG_UPDSA: xfrm_usersa_info,
        XFRM_MSG_DELSA: xfrm_usersa_id,
        XFRM_MSG_GETSA: xfrm_usersa_id,
        XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
        XFRM_MSG_GETPOLICY: xfrm_userpolicy_id,
        XFRM_MSG_EXPIRE: xfrm_user_expire,
        XFRM_MSG_POLEXPIRE: xfrm_user_polexpire,
        XFRM_MSG_FLUSHSA: xfrm_usersa_flush,
        XFRM_MSG_FLUSHPOLICY: xfrm_dump_req,
        XFRM_MSG_MIGRATE: xfrm_migrate,
    }

    def fix_message(self, msg: nlmsg) -> None:
        name = XFRM_MSG_NAMES.get(msg["header"].get("type"))
        if name:
            msg["event"] = name


class AsyncXfrmSocket(AsyncNetlinkSocket):
    marshal_class = MarshalXfrm


REQ_CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
REQ_UPDATE = NLM_F_REQUEST | NLM_F_ACK
REQ_GET = NLM_F_REQUEST
REQ_DUMP = NLM_F_REQUEST | NLM_F_DUMP


class XfrmSocket(NetlinkSocket):
    """A NETLINK_XFRM socket, optionally in the named network namespace (which must exist:
    unlike pyroute2's default, it is not created). Errors raise pyroute2's NetlinkError
    (`.code` is the errno: ESRCH for a missing SA, ENOENT for a missing policy, EEXIST...)."""

    async_class = AsyncXfrmSocket

    def __init__(self, netns: str | None = None, groups: int = 0) -> None:
        super().__init__(family=NETLINK_XFRM, netns=netns, flags=0, nlm_generator=False)
        self.netns = netns
        if groups:
            self.bind(groups=groups)

    def request(self, msg: nlmsg, msg_type: int, flags: int) -> list[nlmsg]:
        return list(self.nlm_request(msg, msg_type=msg_type, msg_flags=flags))

    # SAD
    def sa_add(self, msg: xfrm_usersa_info, update: bool = False) -> None:
        if update:
            self.request(msg, XFRM_MSG_UPDSA, REQ_UPDATE)
        else:
            self.request(msg, XFRM_MSG_NEWSA, REQ_CREATE)

    def sa_get(self, daddr: str, spi: int, proto: int = socket.IPPROTO_ESP) -> xfrm_usersa_info:
        msg = sa_id_msg(daddr, spi, proto)
        return self.request(msg, XFRM_MSG_GETSA, REQ_GET)[0]

    def sa_delete(self, daddr: str, spi: int, proto: int = socket.IPPROTO_ESP) -> None:
        self.request(sa_id_msg(daddr, spi, proto), XFRM_MSG_DELSA, REQ_UPDATE)

    def sa_dump(self) -> list[xfrm_usersa_info]:
        return self.request(xfrm_dump_req(), XFRM_MSG_GETSA, REQ_DUMP)

    def sa_flush(self, proto: int = 0) -> None:
        msg = xfrm_usersa_flush()
        msg["proto"] = proto
        self.request(msg, XFRM_MSG_FLUSHSA, REQ_UPDATE)

    # SPD
    def policy_add(self, msg: xfrm_userpolicy_info, update: bool = False) -> None:
        if update:
            self.request(msg, XFRM_MSG_UPDPOLICY, REQ_UPDATE | NLM_F_CREATE)
        else:
            self.request(msg, XFRM_MSG_NEWPOLICY, REQ_CREATE)

    def policy_get(self, sel: dict[str, Any], direction: int) -> xfrm_userpolicy_info:
        return self.request(policy_id_msg(sel, direction), XFRM_MSG_GETPOLICY, REQ_GET)[0]

    def policy_delete(self, sel: dict[str, Any], direction: int) -> None:
        self.request(policy_id_msg(sel, direction), XFRM_MSG_DELPOLICY, REQ_UPDATE)

    def policy_dump(self) -> list[xfrm_userpolicy_info]:
        return self.request(xfrm_dump_req(), XFRM_MSG_GETPOLICY, REQ_DUMP)

    def policy_flush(self) -> None:
        self.request(xfrm_dump_req(), XFRM_MSG_FLUSHPOLICY, REQ_UPDATE)

    def migrate(self, sel: dict[str, Any], direction: int, moves: list[dict[str, Any]]) -> None:
        """XFRM_MSG_MIGRATE: move the SAs matching `moves` (old -> new addresses) of the
        policy (`sel`, `direction`). Seen on Linux 6.1: template endpoints change only in
        tunnel/BEET mode, and selectors never, so transport-mode moves need replacement."""
        msg = xfrm_migrate()
        msg["sel"] = sel
        msg["dir"] = direction
        msg["attrs"] = [["XFRMA_MIGRATE", moves]]
        self.request(msg, XFRM_MSG_MIGRATE, REQ_UPDATE)

    # notifications
    def wait_events(self, timeout: float) -> list[nlmsg]:
        """Multicast messages (after `bind(groups=...)`) that arrive within `timeout` s."""
        ready, _, _ = select.select([self.fileno()], [], [], timeout)
        if not ready:
            return []
        return list(self.get())


def sa_id_msg(daddr: str, spi: int, proto: int = socket.IPPROTO_ESP) -> xfrm_usersa_id:
    msg = xfrm_usersa_id()
    msg["daddr"] = daddr
    msg["spi"] = spi
    msg["family"] = family_of(daddr)
    msg["proto"] = proto
    return msg


def policy_id_msg(sel: dict[str, Any], direction: int) -> xfrm_userpolicy_id:
    msg = xfrm_userpolicy_id()
    msg["sel"] = sel
    msg["dir"] = direction
    return msg
