"""Shared memory of one chunkserver: segments, the block pool, the fid index, counters."""
