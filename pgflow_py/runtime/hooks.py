"""When ``on_dead`` hooks run: once the store says a failure failed its run for good, and after
that attempt's own ``on_failure`` hook has finished."""

from __future__ import annotations

from collections.abc import Iterable

from ..context import Context
from ..dsl import Hook
from ..store import TaskFailure

__all__ = ("DeadCall", "DeadHooks")

DeadCall = tuple[Hook, Context, BaseException]
"""An ``on_dead`` call: the hook, its context and the error handed to it."""

AttemptKey = tuple[int, int]
"""(task id, attempt). By attempt, not task: a retry may fail while the previous attempt's
``on_failure`` hook still runs."""


class DeadHooks:
    """The ``on_dead`` calls of one runner, from a handler's last failure to their turn."""

    def __init__(self) -> None:
        self._candidates: dict[AttemptKey, DeadCall] = {}  # last attempts not yet recorded
        self._hooking: set[AttemptKey] = set()  # attempts whose on_failure hook runs
        self._after_hook: dict[AttemptKey, DeadCall] = {}  # due once that hook ends
        self._due: list[DeadCall] = []

    def __bool__(self) -> bool:
        """Whether calls are due."""
        return bool(self._due)

    def expect(self, key: AttemptKey, call: DeadCall) -> None:
        """This attempt failed for good: its call is due if its record fails the run."""
        self._candidates[key] = call

    def recorded(self, failures: Iterable[TaskFailure]) -> dict[AttemptKey, DeadCall]:
        """These failures are written: hand back the calls expected of them."""
        candidates = self._candidates
        return {
            key: candidates.pop(key)
            for key in ((f.task_id, f.attempt) for f in failures) if key in candidates
        }

    def run_failed(self, key: AttemptKey | None, call: DeadCall) -> None:
        """The store failed a run for good because of attempt ``key``: the call is due (after
        that attempt's ``on_failure`` hook, if it still runs)."""
        if key is not None and key in self._hooking:
            self._after_hook[key] = call
        else:
            self._due.append(call)

    def hook_started(self, key: AttemptKey) -> None:
        self._hooking.add(key)

    def hook_ended(self, key: AttemptKey) -> bool:
        """The ``on_failure`` hook of ``key`` ended; ``True`` if that made a call due."""
        self._hooking.discard(key)
        call = self._after_hook.pop(key, None)
        if call is None:
            return False
        self._due.append(call)
        return True

    def take(self) -> list[DeadCall]:
        """The calls due now (each is handed out once)."""
        due, self._due = self._due, []
        return due
