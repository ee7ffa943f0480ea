"""NETLINK_XFRM message encoding (pure: no kernel needed).

Layouts are checked against ctypes mirrors of include/uapi/linux/xfrm.h, which apply the C
compiler's alignment rules, so a missing pad field in `xfrm.py` shows up as a wrong offset.
"""

from __future__ import annotations

import ctypes
import socket
import struct

import pytest

from nodes.ipsec import xfrm as X

c_u8, c_u16, c_u32, c_u64, c_int = (
    ctypes.c_uint8,
    ctypes.c_uint16,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_int,
)
Addr = ctypes.c_uint32 * 4  # xfrm_address_t: a union of __be32s, so 4-byte aligned


class CSelector(ctypes.Structure):
    _fields_ = [  # noqa: RUF012
        ("daddr", Addr), ("saddr", Addr), ("dport", c_u16), ("dport_mask", c_u16),
        ("sport", c_u16), ("sport_mask", c_u16), ("family", c_u16), ("prefixlen_d", c_u8),
        ("prefixlen_s", c_u8), ("proto", c_u8), ("ifindex", c_int), ("user", c_u32),
    ]  # fmt: skip


class CId(ctypes.Structure):
    _fields_ = [("daddr", Addr), ("spi", c_u32), ("proto", c_u8)]  # noqa: RUF012


class CLftCfg(ctypes.Structure):
    _fields_ = [(name, c_u64) for name, _ in X.xfrm_lifetime_cfg.fields]  # noqa: RUF012


class CLftCur(ctypes.Structure):
    _fields_ = [(name, c_u64) for name, _ in X.xfrm_lifetime_cur.fields]  # noqa: RUF012


class CStats(ctypes.Structure):
    _fields_ = [("replay_window", c_u32), ("replay", c_u32), ("integrity_failed", c_u32)]  # noqa: RUF012


class CUsersaInfo(ctypes.Structure):
    _fields_ = [  # noqa: RUF012
        ("sel", CSelector), ("id", CId), ("saddr", Addr), ("lft", CLftCfg), ("curlft", CLftCur),
        ("stats", CStats), ("seq", c_u32), ("reqid", c_u32), ("family", c_u16), ("mode", c_u8),
        ("replay_window", c_u8), ("flags", c_u8),
    ]  # fmt: skip


class CUsersaId(ctypes.Structure):
    _fields_ = [("daddr", Addr), ("spi", c_u32), ("family", c_u16), ("proto", c_u8)]  # noqa: RUF012


class CUserpolicyInfo(ctypes.Structure):
    _fields_ = [  # noqa: RUF012
        ("sel", CSelector), ("lft", CLftCfg), ("curlft", CLftCur), ("priority", c_u32),
        ("index", c_u32), ("dir", c_u8), ("action", c_u8), ("flags", c_u8), ("share", c_u8),
    ]  # fmt: skip


class CUserpolicyId(ctypes.Structure):
    _fields_ = [("sel", CSelector), ("index", c_u32), ("dir", c_u8)]  # noqa: RUF012


class CUserTmpl(ctypes.Structure):
    _fields_ = [  # noqa: RUF012
        ("id", CId), ("family", c_u16), ("saddr", Addr), ("reqid", c_u32), ("mode", c_u8),
        ("share", c_u8), ("optional", c_u8), ("aalgos", c_u32), ("ealgos", c_u32),
        ("calgos", c_u32),
    ]  # fmt: skip


class CUserMigrate(ctypes.Structure):
    _fields_ = [  # noqa: RUF012
        ("old_daddr", Addr), ("old_saddr", Addr), ("new_daddr", Addr), ("new_saddr", Addr),
        ("proto", c_u8), ("mode", c_u8), ("reserved", c_u16), ("reqid", c_u32),
        ("old_family", c_u16), ("new_family", c_u16),
    ]  # fmt: skip


class CUserExpire(ctypes.Structure):
    _fields_ = [("state", CUsersaInfo), ("hard", c_u8)]  # noqa: RUF012


class CPolicyType(ctypes.Structure):
    _fields_ = [("type", c_u8), ("reserved1", c_u16), ("reserved2", c_u8)]  # noqa: RUF012


def offsets(fields: tuple, base: int = 0) -> dict[str, int]:
    """Field offsets of an xfrm.py field list, nested structs flattened as 'outer.inner'."""
    out: dict[str, int] = {}
    pos = base
    for name, fmt in fields:
        if not name.startswith("__"):
            out[name] = pos
        if isinstance(fmt, type) and issubclass(fmt, X.XfrmStruct):
            for sub, off in offsets(fmt.fields, pos).items():
                out[f"{name}.{sub}"] = off
        pos += struct.calcsize(fmt) if isinstance(fmt, str) else fmt.size
    out["<size>"] = pos
    return out


def c_offsets(ctype: type[ctypes.Structure], base: int = 0) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, ftype in ctype._fields_:
        off = base + getattr(ctype, name).offset
        out[name] = off
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            for sub, o in c_offsets(ftype, off).items():
                if sub != "<size>":
                    out[f"{name}.{sub}"] = o
    out["<size>"] = base + ctypes.sizeof(ctype)
    return out


LAYOUTS = [
    (X.xfrm_selector.fields, CSelector, 56),
    (X.xfrm_id.fields, CId, 24),
    (X.xfrm_lifetime_cfg.fields, CLftCfg, 64),
    (X.xfrm_lifetime_cur.fields, CLftCur, 32),
    (X.xfrm_stats.fields, CStats, 12),
    (X.xfrm_user_tmpl.fields, CUserTmpl, 64),
    (X.xfrm_user_migrate.fields, CUserMigrate, 76),
    (X.xfrm_usersa_info.fields, CUsersaInfo, 224),
    (X.xfrm_usersa_id.fields, CUsersaId, 24),
    (X.xfrm_userpolicy_info.fields, CUserpolicyInfo, 168),
    (X.xfrm_userpolicy_id.fields, CUserpolicyId, 64),
    (X.xfrm_msg.xfrm_userpolicy_type.fields, CPolicyType, 6),
]


@pytest.mark.parametrize(
    ("fields", "ctype", "size"), LAYOUTS, ids=[c.__name__ for _, c, _ in LAYOUTS]
)
def test_layout_matches_c(fields: tuple, ctype: type[ctypes.Structure], size: int) -> None:
    mine = offsets(fields)
    theirs = c_offsets(ctype)
    assert theirs["<size>"] == size  # the C sizes quoted in the docstrings
    assert {k: mine[k] for k in theirs} == theirs


def test_user_expire_is_usersa_info_plus_hard() -> None:
    mine = offsets(X.xfrm_user_expire.fields)
    assert mine["hard"] == CUserExpire.hard.offset == 224
    assert mine["<size>"] == ctypes.sizeof(CUserExpire) == 232


def sample_sa() -> X.xfrm_usersa_info:
    msg = X.xfrm_usersa_info()
    msg["sel"] = {
        "daddr": "10.0.3.10", "saddr": "10.0.1.10", "family": socket.AF_INET,
        "prefixlen_d": 32, "prefixlen_s": 32, "proto": socket.IPPROTO_UDP,
        "dport": 5062, "dport_mask": 0xFFFF, "sport": 5061, "sport_mask": 0xFFFF,
    }  # fmt: skip
    msg["id"] = {"daddr": "10.0.3.10", "spi": 0x1001, "proto": socket.IPPROTO_ESP}
    msg["saddr"] = "10.0.1.10"
    msg["lft"] = {"hard_add_expires_seconds": 30, "hard_byte_limit": X.XFRM_INF}
    msg["family"] = socket.AF_INET
    msg["mode"] = X.XFRM_MODE_TRANSPORT
    msg["replay_window"] = 32
    msg["attrs"] = [
        ["XFRMA_ALG_CRYPT", {"alg_name": "cbc(aes)", "alg_key_len": 128,
                             "alg_key": X.SecretBytes(bytes(range(16)))}],
        ["XFRMA_ALG_AUTH_TRUNC", {"alg_name": "hmac(sha256)", "alg_key_len": 256,
                                  "alg_trunc_len": 128, "alg_key": X.SecretBytes(bytes(32))}],
        ["XFRMA_REPLAY_VAL", {"oseq": 7, "seq": 5, "bitmap": 0b10111}],
    ]  # fmt: skip
    msg["header"]["type"] = X.XFRM_MSG_NEWSA
    msg["header"]["flags"] = X.REQ_CREATE
    msg.encode()
    return msg


def test_usersa_info_bytes_at_c_offsets() -> None:
    data = bytes(sample_sa().data)
    body = data[16:]
    length, mtype, flags = struct.unpack_from("IHH", data)
    assert (length, mtype, flags) == (len(data), 0x10, 0x0605)  # REQUEST|ACK|EXCL|CREATE
    sel = CUsersaInfo.sel.offset
    assert body[sel : sel + 4] == socket.inet_aton("10.0.3.10")  # sel.daddr
    assert body[sel + 16 : sel + 20] == socket.inet_aton("10.0.1.10")  # sel.saddr
    dport, sport = sel + CSelector.dport.offset, sel + CSelector.sport.offset
    assert body[dport : dport + 2] == b"\x13\xc6"  # __be16 5062
    assert body[sport : sport + 4] == b"\x13\xc5\xff\xff"  # sport, sport_mask
    assert body[sel + CSelector.proto.offset] == 17
    idoff = CUsersaInfo.id.offset
    spi = idoff + CId.spi.offset
    assert body[spi : spi + 4] == b"\x00\x00\x10\x01"  # __be32
    assert body[idoff + CId.proto.offset] == 50
    lft = CUsersaInfo.lft.offset
    assert struct.unpack_from("=8Q", body, lft)[1] == 2**64 - 1  # hard_byte_limit
    assert struct.unpack_from("=8Q", body, lft)[5] == 30  # hard_add_expires_seconds
    assert struct.unpack_from("=H", body, CUsersaInfo.family.offset)[0] == socket.AF_INET
    assert body[CUsersaInfo.replay_window.offset] == 32
    # attributes start at NLMSG_ALIGN(sizeof(struct xfrm_usersa_info))
    nla_len, nla_type = struct.unpack_from("HH", body, 224)
    assert nla_type == 2 and nla_len == 4 + 64 + 4 + 16  # XFRMA_ALG_CRYPT, 16-byte key
    assert body[224 + 4 : 224 + 12] == b"cbc(aes)" and body[224 + 72 : 224 + 88] == bytes(range(16))
    off = 224 + ((nla_len + 3) & ~3)
    nla_len, nla_type = struct.unpack_from("HH", body, off)
    assert nla_type == 20 and nla_len == 4 + 72 + 32  # XFRMA_ALG_AUTH_TRUNC
    assert struct.unpack_from("=II", body, off + 68) == (256, 128)
    off += (nla_len + 3) & ~3
    assert struct.unpack_from("=HHIII", body, off) == (16, 10, 7, 5, 0b10111)  # XFRMA_REPLAY_VAL


def test_usersa_info_round_trip_and_masked_keys() -> None:
    data = sample_sa().data
    msg = X.xfrm_usersa_info(data)
    msg.decode()
    assert X.unpack_addr(msg["id"]["daddr"], socket.AF_INET) == "10.0.3.10"
    assert msg["id"]["spi"] == 0x1001 and msg["sel"]["dport"] == 5062
    assert msg["lft"]["hard_add_expires_seconds"] == 30
    crypt = msg.get_attr("XFRMA_ALG_CRYPT")
    assert crypt["alg_name"].rstrip(b"\0") == b"cbc(aes)"
    assert crypt["alg_key"] == bytes(range(16))
    assert msg.get_attr("XFRMA_ALG_AUTH_TRUNC")["alg_trunc_len"] == 128
    assert msg.get_attr("XFRMA_REPLAY_VAL")["oseq"] == 7
    text = repr(msg)
    assert "secret bytes" in text and repr(bytes(range(16))) not in text


def test_policy_with_template_round_trip() -> None:
    msg = X.xfrm_userpolicy_info()
    msg["sel"] = {"daddr": "10.0.3.10", "saddr": "10.0.1.10", "family": 2, "proto": 17}
    msg["dir"] = X.XFRM_POLICY_OUT
    msg["priority"] = 1000
    tmpl = {"id": {"daddr": "10.0.3.10", "proto": 50, "spi": 0x1001}, "family": 2,
            "saddr": "10.0.1.10", "mode": 0, "aalgos": 0xFFFFFFFF}  # fmt: skip
    msg["attrs"] = [["XFRMA_TMPL", [tmpl, tmpl]]]
    msg.encode()
    assert len(msg.data) == 16 + 168 + 4 + 2 * 64
    back = X.xfrm_userpolicy_info(msg.data)
    back.decode()
    tmpls = back.get_attr("XFRMA_TMPL")
    assert len(tmpls) == 2 and tmpls[1]["id"]["spi"] == 0x1001 and tmpls[0]["aalgos"] == 2**32 - 1
    assert back["dir"] == 1 and back["priority"] == 1000


def test_small_messages() -> None:
    sa_id = X.sa_id_msg("fd00::1", 0x2002)
    sa_id.encode()
    body = bytes(sa_id.data[16:])
    assert len(body) == 24 and body[:16] == socket.inet_pton(socket.AF_INET6, "fd00::1")
    assert body[16:20] == b"\x00\x00\x20\x02" and struct.unpack_from("=HB", body, 20) == (10, 50)
    flush = X.xfrm_usersa_flush()
    flush["proto"] = 50
    flush.encode()
    assert bytes(flush.data[16:]) == b"\x32\0\0\0"
    mig = X.xfrm_migrate()
    mig["sel"] = {"family": 2}
    mig["dir"] = 1
    move = {"old_daddr": "10.0.0.1", "new_daddr": "10.0.9.1", "proto": 50}
    mig["attrs"] = [["XFRMA_MIGRATE", [{**move, "old_family": 2, "new_family": 2}]]]
    mig.encode()
    assert len(mig.data) == 16 + 64 + 4 + 76
    back = X.xfrm_migrate(mig.data)
    back.decode()
    assert X.unpack_addr(back.get_attr("XFRMA_MIGRATE")[0]["new_daddr"], 2) == "10.0.9.1"


def test_user_expire_decodes() -> None:
    sa = sample_sa()
    raw = bytearray(sa.data[: 16 + 224]) + b"\x01" + bytes(7)
    struct.pack_into("IH", raw, 0, len(raw), X.XFRM_MSG_EXPIRE)
    msg = X.MarshalXfrm().parse(bytes(raw))
    (exp,) = list(msg)
    assert exp["event"] == "XFRM_MSG_EXPIRE" and exp["hard"] == 1 and exp["id"]["spi"] == 0x1001


def test_addresses() -> None:
    assert X.pack_addr("10.1.2.3") == bytes([10, 1, 2, 3]) + bytes(12)
    assert X.pack_addr(None) == bytes(16)
    with pytest.raises(ValueError):
        X.pack_addr("10.1.2")
    with pytest.raises(ValueError):
        X.unpack_addr(bytes(16), 99)
    assert X.unpack_addr(X.pack_addr("fd00::5"), socket.AF_INET6) == "fd00::5"
