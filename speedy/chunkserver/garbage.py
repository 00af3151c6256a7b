"""When a chunk's garbage makes it due for compaction (the writer's compactor and the
workers' COMPACT answer use the one rule; imports nothing, like messages.py)."""
from __future__ import annotations

MIN_GARBAGE = 1 << 20  # automatic compaction: at least this much garbage (or 1/64 chunk)


def qualifies(garbage: int, used: int, capacity: int, threshold: float,
              automatic: bool = False) -> bool:
    """Whether a chunk with that garbage is due for compaction at threshold (a fraction of
    its used bytes); automatic runs also want MIN_GARBAGE (or 1/64 of the chunk)."""
    if garbage <= 0 or used <= 0:
        return False
    if automatic and garbage < min(MIN_GARBAGE, capacity // 64):
        return False
    return garbage >= threshold * used
