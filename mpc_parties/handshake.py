"""Session opening: the public handshake every session starts with.

The client opens a session on the server's front door with a ``hello`` (JSON: session id,
protocol, model, variant, input shape, preprocessing budget). Everything in it is public by the
threat model. The server checks it against its own configuration and answers ``welcome`` with
the address of the worker process that will run this session, or ``refused`` with the reason:
mismatched configurations stop here, before any secret moves.
"""

from __future__ import annotations

from typing import Any

from protocols.net.channels import Channel, ProtocolError
from protocols.session_spec import PROTOCOLS, SessionRefused, SessionSpec, new_session_id

__all__ = ["PROTOCOLS", "SessionRefused", "SessionSpec", "new_session_id", "send_hello", "refuse",
           "TAG_HELLO", "TAG_WELCOME"]

TAG_HELLO = "session.hello"
TAG_WELCOME = "session.welcome"


def send_hello(channel: Channel, spec: SessionSpec) -> dict[str, Any]:
    """Client side: send the hello, return the welcome (raise SessionRefused if refused)."""
    channel.send_json(TAG_HELLO, spec.to_json())
    reply = channel.recv_json(TAG_WELCOME)
    if not isinstance(reply, dict) or "status" not in reply:
        raise ProtocolError(f"{channel.peer} sent a malformed welcome")
    if reply["status"] != "ok":
        raise SessionRefused(f"{channel.peer} refused the session: {reply.get('reason', 'no reason given')}")
    return reply


def refuse(channel: Channel, reason: str) -> None:
    """Server side: answer a hello with a refusal and its reason."""
    channel.send_json(TAG_WELCOME, {"status": "refused", "reason": reason})
