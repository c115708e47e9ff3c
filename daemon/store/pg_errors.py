"""Which asyncpg errors mean "the database cannot serve this now", for every PostgreSQL module.

Connection refused or lost, the server shutting down or starting, a timeout, a pool closing:
the caller retries (or answers 503), it never treats them as a bug in its own data.
"""

from __future__ import annotations

import asyncpg

UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A connection left mid-operation by a lost server ("another operation is in progress").
    asyncpg.InternalClientError,
)
