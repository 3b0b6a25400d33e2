"""Garbage collection in ``kiln serve``'s long-running processes (ADR 0043).

CPython's cyclic collector walks every tracked object of the oldest generation in a full
collection, holding the interpreter lock throughout. ``kiln serve``'s processes load botocore's
service models and moto's backends at start (hundreds of thousands of objects that live as long
as the process): measured under the issue's load (20 clients, 2 cores), the embedded stack's
process made a full collection every ~4 s, each stopping every request it served for 0.1-1.2 s
(the API's p99: 1.3-1.9 s), and the API workers' for up to 0.4 s. :func:`settle` moves what
start-up built out of the collector's reach (``gc.freeze``), so later collections walk only
what was allocated since.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def settle(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collect once, then exempt every object alive now from later collections (call once a
    process has finished starting: what start-up allocated lives until the process ends)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
