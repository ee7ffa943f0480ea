"""Where the proxy sends a request it admitted (DESIGN §1, §2 "Routes and trust").

* A terminal's request outside a dialog must address a user of our domain (or a terminal's
  registered contact, which stands for that terminal); between users who are not friends it
  gets `403`. A Route past this proxy gets `403` (`416` if it is not a SIP URI): the proxy is
  nobody's relay.
* A request inside a dialog (To tag), and an ACK for a 2xx, must belong to an INVITE dialog
  this proxy record-routed and go from one of its parties to the other: `403` otherwise
  (an ACK is dropped). It goes to the peer's latest contact when the peer switched links
  (Fig 4).
* Terminals are reached at their registered Contact, in ipsec-m2ms mode from the protected
  client port; the servers at their configured address, from our unprotected port.
"""

from __future__ import annotations

from nodes.labconfig import LabConfig
from nodes.labconfig import Terminal as TerminalConfig
from nodes.proxy_admission import Admission, Endpoints
from nodes.proxy_dialogs import Dialogs, Hop
from nodes.registrar import Binding, Registrar
from nodes.sip.headers import NameAddr
from nodes.sip.message import Request
from nodes.sip.transaction import ServerTransaction
from nodes.sip.uri import SipUri


class Router:
    def __init__(self, config: LabConfig, listen: str, our_ports: frozenset[int],
                 registrar: Registrar, dialogs: Dialogs, link_moved: dict[str, Binding],
                 endpoints: Endpoints, admission: Admission) -> None:
        self.config, self.listen, self.our_ports = config, listen, our_ports
        self.registrar, self.dialogs = registrar, dialogs
        self.link_moved = link_moved  # AOR -> binding it moved to (Fig 4), set on REGISTER
        self.endpoints = endpoints
        self.admission = admission  # refusals are recorded there

    def _is_us(self, uri: object) -> bool:
        return isinstance(uri, SipUri) and uri.host == self.listen and \
            (uri.port or 5060) in self.our_ports

    def _strip_own_route(self, req: Request) -> list[NameAddr]:
        """Removes the top Route if it names us (our Record-Route, as the dialog's parties
        send it back); returns the Routes left (ValueError if they are malformed)."""
        routes = req.routes
        if routes and self._is_us(routes[0].uri):
            req.pop_top("route")
            routes = routes[1:]
        return routes

    def route(self, tx: ServerTransaction, trusted: bool) -> Hop | None:
        """Decide the next hop, or answer the request ourselves and return None."""
        req = tx.request
        routes = self._strip_own_route(req)
        if routes:  # we are the only proxy here: a Route elsewhere is a relay request
            if not isinstance(routes[0].uri, SipUri):
                self.admission.refuse(tx, 416, "Unsupported URI Scheme in Route",
                                      "refused-route",
                                      f"Route {routes[0].uri} is not a SIP URI")
            else:
                self.admission.refuse(tx, 403, "Route does not lead through this proxy",
                                      "forbidden-route", f"Route to {routes[0].uri}")
            return None
        if not isinstance(req.uri, SipUri):
            tx.reply(416)
            return None
        if req.to is not None and req.to.tag is not None and not trusted:
            return self._route_in_dialog(tx)
        return self._route_out_of_dialog(tx, req.uri, trusted)

    def _route_out_of_dialog(self, tx: ServerTransaction, uri: SipUri,
                             trusted: bool) -> Hop | None:
        """A user of our domain (a server or a terminal), or a terminal's registered
        contact; from a terminal, only to a friend's terminal (or its own user's)."""
        req = tx.request
        endpoint = self.endpoints.main
        assert endpoint is not None
        if uri.host.lower() == self.config.domain:
            server = self.config.servers.get(uri.user or "")
            if server is not None and server != self.listen:
                return Hop(endpoint, (server, 5060))
            callee = self.config.terminal_of(uri.aor())
            if callee is None:
                tx.reply(404, "No such user")
                return None
            if not trusted and not self._allowed(tx, callee):
                return None
            bindings = self.registrar.bindings(uri.aor())
            if not bindings:
                tx.reply(480, "Not registered")
                return None
            binding = max(bindings, key=lambda b: b.registered_ns)
            req.set_uri(binding.contact.uri)
            return self.hop_to(binding)
        # A contact URI: it stands for the terminal registered there, with its policy.
        binding = self._binding_for_contact(uri)
        if binding is None:
            tx.reply(404, "Unknown target")
            return None
        callee = self.config.terminal_of(binding.aor)
        if not trusted and (callee is None or not self._allowed(tx, callee)):
            return None
        return self.hop_to(self._moved(binding))

    def _allowed(self, tx: ServerTransaction, callee: TerminalConfig) -> bool:
        """The friends-only policy between the sender's user and the callee's (DESIGN §1)."""
        req = tx.request
        frm = req.from_
        caller = self.config.terminal_of(frm.uri.aor()) if frm and isinstance(
            frm.uri, SipUri) else None
        if caller and self.config.may_contact(caller.name, callee.name):
            return True
        self.admission.refuse(tx, 403, "Not a friend", "forbidden-policy", "not friends",
                              caller=caller.name if caller else None, callee=callee.name)
        return False

    def _route_in_dialog(self, tx: ServerTransaction) -> Hop | None:
        target = self._dialog_target(tx.request)
        if isinstance(target, str):
            self.admission.refuse(tx, 403, "Not in a dialog set up through this proxy",
                                  "forbidden-dialog", target)
            return None
        return self.hop_to(target)

    def ack_target(self, req: Request, trusted: bool) -> Binding | str:
        """For an ACK to a 2xx (its sender admitted): the binding it goes to, or why it may
        go nowhere. A server's ACK goes to the contact it names, a terminal's only to its
        dialog's peer."""
        if self._strip_own_route(req):
            return "Route does not lead through this proxy"
        uri = req.uri
        if not isinstance(uri, SipUri) or req.to is None or req.to.tag is None:
            return "not an ACK inside a dialog"
        if trusted:
            binding = self._binding_for_contact(uri)
            return "unknown target" if binding is None else binding
        return self._dialog_target(req)

    def _dialog_target(self, req: Request) -> Binding | str:
        """For a terminal's in-dialog request (its From already checked): the binding of
        the dialog's other party it goes to, or why it may not go anywhere."""
        frm, to = req.from_, req.to
        assert frm is not None and to is not None and isinstance(frm.uri, SipUri)
        dlg = self.dialogs.find(req.call_id or "", frm.tag or "", to.tag or "")
        if dlg is None:
            return "no dialog with these tags went through this proxy"
        peer = dlg.peer(frm.tag or "", frm.uri.aor())
        if peer is None:
            return "the sender is not the dialog party that chose its From tag"
        uri = req.uri
        binding = self._binding_for_contact(uri) if isinstance(uri, SipUri) else None
        if binding is not None and binding.aor != peer:
            return "the Request-URI is not the dialog peer's contact"
        if binding is None:  # its contact went (Fig 4: it moved): its latest binding
            bindings = self.registrar.bindings(peer)
            if not bindings:
                return "the dialog peer is not registered"
            binding = max(bindings, key=lambda b: b.registered_ns)
        moved = self._moved(binding)
        if moved is not binding or not self._same_contact(binding, uri):
            req.set_uri(moved.contact.uri)
        return moved

    @staticmethod
    def _same_contact(binding: Binding, uri: object) -> bool:
        return isinstance(uri, SipUri) and isinstance(binding.contact.uri, SipUri) and \
            uri.host_port() == binding.contact.uri.host_port()

    def _moved(self, binding: Binding) -> Binding:
        """In-dialog requests for a terminal follow its link switch (Fig 4)."""
        moved = self.link_moved.get(binding.aor)
        if moved is not None and moved is not binding and \
                moved in self.registrar.bindings(binding.aor):
            return moved
        return binding

    def _binding_for_contact(self, uri: SipUri) -> Binding | None:
        return self.registrar.binding_for_contact(uri.host, uri.port or 5060)

    def hop_to(self, binding: Binding) -> Hop:
        """Terminals are reached at their Contact (host and port; the registrar took only IP
        hosts); in ipsec-m2ms mode from our protected client port, so the request rides the
        SA server port-c → client port-s."""
        eps = self.endpoints
        ep = eps.c if eps.c is not None else eps.main
        assert ep is not None and isinstance(binding.contact.uri, SipUri)
        return Hop(ep, binding.contact.uri.host_port(), binding.aor)
