"""IPsec for smig-lab nodes: one API (`api.IPsecBackend`), two backends.

* `kernel` — Linux XFRM SPD/SAD over NETLINK_XFRM (declared in `xfrm`).
* `userspace` — an RFC 4303 ESP engine on a TUN device, wire-identical to the kernel's.

`select_backend()` picks one from the capability probe; see DESIGN §3 "IPsec backends".
"""
