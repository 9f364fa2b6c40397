"""The controller's state: one ``StateStore`` Protocol, in memory, in SQLite and in the Kubernetes API."""

from controller.store.base import StateStore, StoreConflict, StoreUnavailable
from controller.store.kubernetes import KubernetesStore, KubernetesStoreSettings
from controller.store.memory import MemoryStore
from controller.store.sqlite import SqliteStore

__all__ = ["StateStore", "StoreConflict", "StoreUnavailable", "MemoryStore", "SqliteStore", "KubernetesStore",
           "KubernetesStoreSettings"]
