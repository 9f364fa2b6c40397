"""The controller's state: one ``StateStore`` Protocol, in memory and in SQLite."""

from controller.store.base import StateStore
from controller.store.memory import MemoryStore
from controller.store.sqlite import SqliteStore

__all__ = ["StateStore", "MemoryStore", "SqliteStore"]
