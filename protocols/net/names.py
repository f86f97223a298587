"""The names every link agrees on: party roles and session ids (one rule, used by the handshake,
the transport and the certificates)."""

from __future__ import annotations

import re
import secrets

CLIENT = "client"
SERVER = "server"
DEALER = "dealer"
ROLES = (CLIENT, SERVER, DEALER)

SESSION_ID_RULE = "1-64 characters of A-Za-z0-9._-"
_SESSION_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def is_session_id(session: object) -> bool:
    """Whether ``session`` is a valid session id (:data:`SESSION_ID_RULE`)."""
    return isinstance(session, str) and _SESSION_ID.match(session) is not None


def new_session_id() -> str:
    """A fresh random session id (public: it names the session on every link)."""
    return "s-" + secrets.token_hex(8)
