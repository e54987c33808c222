"""Results gathered by a runner's workers, waiting to be written in the next transaction."""

from __future__ import annotations

from ..store import TaskFailure, TaskSuccess

__all__ = ("Outbox",)


class Outbox:
    """Successes and failures not yet recorded: taken for a write, put back if it fails."""

    __slots__ = ("failures", "successes")

    def __init__(self) -> None:
        self.successes: list[TaskSuccess] = []
        self.failures: list[TaskFailure] = []

    def __bool__(self) -> bool:
        return bool(self.successes or self.failures)

    def __len__(self) -> int:
        return len(self.successes) + len(self.failures)

    def take(self) -> tuple[list[TaskSuccess], list[TaskFailure]]:
        taken = self.successes, self.failures
        self.successes, self.failures = [], []
        return taken

    def put_back(self, successes: list[TaskSuccess], failures: list[TaskFailure]) -> None:
        """Return results whose write failed, ahead of those gathered since."""
        self.successes[:0] = successes
        self.failures[:0] = failures
