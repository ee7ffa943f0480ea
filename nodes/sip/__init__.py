"""smig-lab's own asyncio SIP stack (RFC 3261 over UDP, no SIP library).

Modules: uri (SIP/absolute URIs), headers (Via, NameAddr, CSeq, ...), message (framing,
Request/Response, response_to, SipParseError), checks (check_request/SipError/Policy),
sdp, multipart, timers, transport (UDP and in-process lossy network), transaction
(RFC 3261/6026 state machines), endpoint (SipEndpoint: the transaction layer) and
dialog (Dialog, UserAgent).
"""
