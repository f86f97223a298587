"""Public names the command line lists before it imports torch: the text tasks of
:mod:`models.data` and the base models :mod:`models.distill_parts` can fine-tune. Kept apart so
that building ``privinf``'s parser costs no torch import (~1 s per command)."""

from __future__ import annotations

TEXT_TASKS = ("sms", "tweets")
DISTILL_BASES = ("minilm", "minilm-2l", "tiny-bert")
