"""kiln serve's processes exempt their start-up heap from garbage collection (ADR 0043)."""

from __future__ import annotations

import gc

from kiln.local import heap


def test_settle_freezes_what_is_alive():
    # GIVEN a process with objects alive (this one) and the collector as Python sets it
    before = gc.get_threshold()
    alive = [[index] for index in range(10)]  # lists: objects the collector tracks
    try:
        # WHEN it settles after start-up
        heap.settle()
        # THEN what was alive is out of the collector's reach (frozen); its thresholds stay Python's
        assert gc.get_freeze_count() >= len(alive)
        assert gc.get_threshold() == before
        # and a collection walks only what came after: it no longer sees the frozen objects
        assert not any(o is alive[0] for o in gc.get_objects())
    finally:
        gc.unfreeze()  # the test process goes on as it was
        gc.set_threshold(*before)
