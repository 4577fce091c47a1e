"""Garbage-collector settings for code that handles events in batches.

Each event becomes about a dozen container objects (the pydantic instances, their field sets,
lists of lines) that live only until its batch is stored. With CPython's default gen-0 threshold
(700) a 2,000-event batch sets off dozens of young collections, each walking every live event
of the batch, and promotes them all to older generations whose collections walk them again;
none of it frees anything, because nothing in those objects is cyclic garbage. A threshold of
50,000 lets a whole batch come and go between collections (parse_event: ~169,000 → ~240,000
lines/s in bench/parse_bench.py). Memory is not at stake: reference counting frees the events
the moment their batch is dropped, the collector only ever finds reference cycles.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

BATCH_GEN0_THRESHOLD = 50_000

_lock = threading.Lock()
_depth = 0
_saved: tuple[int, ...] = ()


@contextmanager
def batch_gc_thresholds() -> Iterator[None]:
    """Raise the gen-0 threshold while batches are handled; the previous thresholds come back after.

    Nested or concurrent users (the drop folder's thread inside the web app, say) share one
    raise: the thresholds are restored when the last of them leaves.
    """
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(max(BATCH_GEN0_THRESHOLD, _saved[0]), *_saved[1:])
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.set_threshold(*_saved)


def freeze_startup_objects() -> None:
    """Move everything alive now out of the collector's reach.

    Long-lived start-up objects (modules, table metadata, settings) would otherwise be walked by
    every full collection that a batch's new events set off.
    """
    gc.collect()
    gc.freeze()
