"""Storage: the public :class:`Store`, the backend boundary and the SQLite backend."""

from .base import Backend, ClaimedTask, NewRun, RunFailure, TaskFailure, TaskSuccess, Undecodable
from .store import Store, connect

__all__ = (
    "Backend",
    "ClaimedTask",
    "NewRun",
    "RunFailure",
    "Store",
    "TaskFailure",
    "TaskSuccess",
    "Undecodable",
    "connect",
)
