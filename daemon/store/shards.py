"""Segments onto shards: the unit of ownership when several processes share one journal.

The mapping must be the same in every process and every version: a stable hash (CRC-32 of the
segment id's UTF-8), never Python's `hash()`, which is salted per process. The number of shards
is fixed for a journal; it bounds how finely segments can be spread over instances, and 64 is
more instances than a tenant's write limit (10 bulk requests/s) could ever keep busy.
"""

from __future__ import annotations

import functools
import zlib

SHARDS = 64


# Asked at every state change of an assignment, of a few hundred segment ids at most.
@functools.lru_cache(maxsize=65_536)
def shard_of(segment_id: str) -> int:
    """The shard a segment belongs to, in [0, SHARDS)."""
    return zlib.crc32(segment_id.encode("utf-8", "surrogatepass")) % SHARDS
