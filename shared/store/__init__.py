"""The Postgres store: all of Conveyor's SQL, one module per table, plus migrations."""

from shared.store.db import Database

__all__ = ["Database"]
