"""The journal: its roles and backends (`daemon.store.base`), and `from_url`, which picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.store.base import (
    AssignmentJournal,
    ConfirmationStore,
    DeliveryLog,
    JournalStore,
    NotificationOutbox,
    Recovered,
    RefreshBudgetStore,
    SharedJournal,
    StoreOpenError,
    StoreUnreachable,
)

if TYPE_CHECKING:
    from daemon.config import StoreConfig

__all__ = [
    "AssignmentJournal",
    "ConfirmationStore",
    "DeliveryLog",
    "JournalStore",
    "NotificationOutbox",
    "Recovered",
    "RefreshBudgetStore",
    "SharedJournal",
    "StoreOpenError",
    "StoreUnreachable",
    "check_url",
    "from_url",
]


def check_url(config: StoreConfig) -> None:
    """Raise ValueError unless `store.url` names a store this installation can open.

    No I/O: the URL's form, and for PostgreSQL that its driver can be imported (it is an
    optional extra), so that a missing driver is a configuration error naming the fix.
    """
    scheme, _, rest = config.url.partition("://")
    if scheme == "memory":
        return
    if scheme == "sqlite":
        if not rest:
            raise ValueError("store.url: sqlite:// needs a file path")
        return
    if scheme in ("postgresql", "postgres"):
        if not rest:
            raise ValueError("store.url: postgresql:// needs a host and database")
        try:
            # The backend module imports asyncpg (the `postgres` extra), needed by it only.
            import daemon.store.postgres  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f"store.url: {scheme}:// needs the PostgreSQL driver, which cannot be loaded "
                f"({exc}); install it with: pip install 'cxone-segmap[postgres]'"
            ) from None
        return
    raise ValueError(f"store.url: {scheme}:// is not a store segmapd knows")


def from_url(config: StoreConfig) -> JournalStore:
    """The store `store.url` names: `memory://`, `sqlite://PATH` or `postgresql://...`.

    `sqlite:///abs/path` (or `sqlite://rel/path`); `postgresql://user@host:port/database` (or
    `postgres://`), with the role's password from store.password, never in the URL.

    Each backend's module is imported only when it is used, so that a driver one backend
    needs is not needed by the others. Raises ValueError for a URL that names no store, or a
    backend whose driver is not installed (see `check_url`).
    """
    check_url(config)
    scheme, _, rest = config.url.partition("://")
    if scheme == "memory":
        from daemon.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from daemon.store.sqlite import SqliteStore

        return SqliteStore(
            rest, synchronous=config.synchronous, retention_s=config.retention_days * 86_400
        )
    from daemon.store.postgres import PostgresStore

    return PostgresStore(
        config.url,
        password=config.password.get_secret_value(),
        retention_s=config.retention_days * 86_400,
    )
