"""The exception hierarchy: everything pgflow_py raises derives from :class:`PgflowError`."""

from __future__ import annotations

__all__ = (
    "DefinitionError",
    "FlowNotFound",
    "InputError",
    "IsolatedError",
    "PermanentFailure",
    "PgflowError",
    "Retry",
    "RunNotFound",
    "SchemaError",
    "ShapeMismatch",
    "StepTimeout",
    "StoreError",
    "WaitTimeout",
)


class PgflowError(Exception):
    """Base class of every error raised by pgflow_py."""


class DefinitionError(PgflowError):
    """A job or flow definition is invalid (raised at decoration time)."""


class InputError(PgflowError, ValueError):
    """A run input cannot be accepted; nothing was written."""


class RunNotFound(PgflowError, LookupError):
    """No run with the given id exists in the store."""


class FlowNotFound(PgflowError, LookupError):
    """No definition with the given flow slug exists in the store."""


class ShapeMismatch(PgflowError):
    """A flow's shape (steps, dependencies, conditions) differs from the stored definition while
    runs of it that cannot move to the new shape are unfinished (see ``Store.register``)."""


class SchemaError(PgflowError):
    """The database cannot be used: written by a newer pgflow_py, or not a pgflow database."""


class StepTimeout(PgflowError, TimeoutError):
    """An attempt ran past its timeout; recorded as the attempt's error."""


class PermanentFailure(PgflowError):
    """Raise in a handler to fail the run for good now, without further attempts."""


_MAX_RETRY_DELAY = 10 * 365 * 86400.0  # as a step's start_delay


class Retry(PgflowError):
    """Raise in a handler to fail this attempt and retry after exactly ``delay`` seconds.

    The retry still counts as an attempt: once ``max_attempts`` is reached the run fails.
    """

    def __init__(self, delay: float, reason: str = "") -> None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not (
            0 <= delay <= _MAX_RETRY_DELAY  # also refuses NaN
        ):
            raise ValueError(
                f"Retry delay must be a number of seconds from 0 to {_MAX_RETRY_DELAY:g} "
                f"(10 years), got {delay!r}"
            )
        super().__init__(reason or f"retry requested in {delay:g}s")
        self.delay = float(delay)
        self.reason = reason


class WaitTimeout(PgflowError, TimeoutError):
    """``store.wait`` gave up before the run finished."""


class IsolatedError(PgflowError):
    """An exception raised by a handler running in a child process (``isolation="process"``).

    Its type name, message and formatted traceback cross the process boundary; the error
    recorded for the attempt reads ``"<type name>: <message>"`` as for an in-process exception.
    """

    def __init__(self, type_name: str, message: str, traceback: str | None = None) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        """The child's formatted traceback."""


class StoreError(PgflowError):
    """The database failed (read-only, disk full, corrupt, locked too long); says where and why."""
