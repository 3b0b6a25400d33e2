"""Garbage collection in ``kiln serve``'s long-running processes (ADR 0043).

CPython's cyclic collector walks every tracked object of the oldest generation in a full
collection, holding the interpreter lock throughout. ``kiln serve``'s processes load botocore's
service models and moto's backends at start (~440,000 objects in the embedded stack's process, ~
as long-lived as the process), so each full collection walked them all again: under the issue's
load (20 clients, 2 shared cores) the stack's made one every few seconds, pausing every request it
served for 0.1-1.2 s. :func:`settle` moves what start-up built out of the collector's reach
(``gc.freeze``): later full collections walk only what was allocated since. The collector's
thresholds stay Python's: larger young generations were measured to make longer pauses (a
50,000-object threshold: a 0.5 s middle-generation collection of 380,000 cyclic objects).
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect once, then exempt every object alive now from later collections (call once a
    process has finished starting: what start-up allocated lives until the process ends)."""
    gc.collect()
    gc.freeze()
