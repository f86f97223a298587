"""Which exceptions are the user's to fix: the CLI prints them as one line, not a traceback.

This module is a leaf like the ledger. Packages below raise ``ValueError`` subclasses for bad
input (unknown model or variant, wrong shapes, out-of-range values, mismatched configs) and
``RuntimeError`` subclasses from :mod:`protocols.transport` when a peer fails; both reach the
user as a single line naming the problem.
"""

from __future__ import annotations


class PrivinfError(ValueError):
    """Bad input or configuration detected at a boundary, before any secret moves."""


class PartyFailure(RuntimeError):
    """Another party failed or went away; the message names it."""
