"""Freeing blobs no metadata refers to any more: now, or queued in gateway_garbage and
retried (by later frees and by worker 0's maintenance) until every replica dropped them."""
from __future__ import annotations

import logging
from typing import Any

from speedy.client import NotFoundError, SpeedyError, parse_key
from speedy.gateway.meta import Key, MetaError

log = logging.getLogger("speedy.gateway.garbage")

GARBAGE_RETRY_AFTER = 30.0   # seconds before a failed free is retried
GARBAGE_SWEEP = 8            # old queued blobs retried per freeing request


def free_blobs(app: Any, blobs: list[Key], queued: bool = True) -> None:
    """Delete blobs no path refers to from every replica; failures stay queued for later.

    Also retries a few blobs whose earlier free failed. queued=False: the blob was never
    recorded (its upload's metadata failed), so a failed free queues it.
    """
    for b in blobs:
        free_blob(app, b, queued)
    if blobs:
        sweep_garbage(app, GARBAGE_SWEEP)


def sweep_garbage(app: Any, limit: int = 100, older_than: float = GARBAGE_RETRY_AFTER) -> int:
    """Retry freeing queued blobs (a daemon may call this periodically); how many are gone."""
    try:
        queued = app.meta.garbage(older_than, limit)
    except MetaError as e:
        log.warning("cannot read the garbage queue: %s", e)
        return 0
    return sum(free_blob(app, b, True) for b in queued)


def forget_blob(app: Any, key: str) -> None:
    """Delete a blob that was just written and will not be used (queued if that fails)."""
    free_blob(app, parse_key(key), queued=False)


def free_blob(app: Any, blob: Key, queued: bool) -> bool:
    """Delete one blob everywhere; True when it is gone (and dropped from the queue)."""
    try:
        missed = app.client.delete(blob)
    except NotFoundError:
        missed = []
    except (SpeedyError, OSError) as e:
        missed = [str(e)]
    try:
        if not missed:
            if queued:
                app.meta.forget_garbage(blob)
            return True
        log.warning("blob %s not freed everywhere (%s): retried later", blob,
                    "; ".join(missed))
        if queued:
            app.meta.retry_garbage_later(blob)
        else:
            app.meta.queue_garbage(blob)
    except MetaError as e:
        log.warning("blob %s: cannot update the garbage queue: %s", blob, e)
    return False
