"""Typed protobuf wire format of party links (``privinf.proto``) and its generated gRPC code.

``pb`` is the message module (``Frame``, ``ReadyRequest``, ``ReadyReply``, ``FrameKind``),
``rpc`` the service module (``PartyLinkStub``, ``PartyLinkServicer``,
``add_PartyLinkServicer_to_server``). Regenerate with ``python -m protocols.net.wire.regenerate``.
They load lazily so that regeneration still runs when the generated code is missing or stale.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {"pb": "protocols.net.wire._generated.privinf_pb2", "rpc": "protocols.net.wire._generated.privinf_pb2_grpc"}

__all__ = ["pb", "rpc"]


def __getattr__(name: str) -> ModuleType:
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'protocols.net.wire' has no attribute {name!r}")
