"""Wake-ups from other processes on PostgreSQL: one ``LISTEN`` connection per runner.

Write transactions that queue work send one ``NOTIFY`` on the schema's channel as they commit
(payload: the flow slugs, comma-separated; empty for "any flow"). A :class:`Listener` holds a
connection of its own in a daemon thread and hands each notification to a callback, so an
idle runner claims within milliseconds instead of at its next poll. Polling stays the
fallback: while the connection is down, :attr:`Listener.connected` is false, the runner
watches the store as it did without one, and the thread reconnects with a growing backoff.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pgflow_py.store")

__all__ = ("Listener", "channel_for")

_MAX_PAYLOAD = 7_000  # bytes; PostgreSQL refuses a payload of 8,000 or more
_NAME_MAX = 63  # PostgreSQL's identifier length
_STOP_CHECK = 0.25  # seconds between looks at whether close() was called
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0


def channel_for(schema: str) -> str:
    """The ``NOTIFY`` channel of ``schema``: one per schema, so that runners of one schema
    never wake for another's work (a long name keeps a prefix and a hash of the whole)."""
    name = f"pgflow_{schema}"
    if len(name) > _NAME_MAX:
        name = f"{name[:_NAME_MAX - 9]}_{zlib.crc32(schema.encode()):08x}"
    return name


def payload_for(flow_slugs: set[str]) -> str:
    """The payload naming ``flow_slugs`` (empty: any flow, also when too many to name)."""
    if "" in flow_slugs:
        return ""
    payload = ",".join(sorted(flow_slugs))
    return payload if len(payload) <= _MAX_PAYLOAD else ""


class Listener:
    """A daemon thread that ``LISTEN``s on ``channel`` and calls ``callback(flow_slugs)`` for
    each notification not sent by ``own_pid()`` (``None`` for "any flow", also after a
    reconnection, when notifications may have been missed)."""

    def __init__(
        self,
        psycopg: Any,
        url: str,
        channel: str,
        where: str,
        callback: Callable[[frozenset[str] | None], None],
        own_pid: Callable[[], int | None],
        redact: Callable[[str], str],
    ) -> None:
        self._psycopg = psycopg
        self._url = url
        self._channel = channel
        self._where = where
        self._callback = callback
        self._own_pid = own_pid
        self._redact = redact
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.connected = False
        self._thread = threading.Thread(
            target=self._run, name=f"pgflow-listen-{channel}", daemon=True
        )

    def start(self, wait: float = 2.0) -> None:
        """Start listening; return once the channel is listened to, or after ``wait``
        seconds (polling covers the time until then)."""
        self._thread.start()
        self._ready.wait(wait)

    def close(self, wait: float = 1.0) -> None:
        """Stop the thread (it sees the request within ``_STOP_CHECK`` seconds); never
        blocks longer than ``wait``, and the thread, a daemon, never keeps the process alive."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(wait)

    def _run(self) -> None:
        backoff = _BACKOFF_FIRST
        lost = False  # a warning was logged for the current outage
        first = True
        while not self._stop.is_set():
            try:
                db = self._psycopg.connect(self._url, autocommit=True)
            except Exception as exc:
                if not lost:
                    lost = True
                    log.warning(
                        "could not open the LISTEN connection %s (%s); polling for work from "
                        "other processes, and retrying", self._where, self._redact(_first_line(exc)),
                    )
                self._ready.set()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            try:
                db.execute(f"LISTEN {self._channel}")
                self.connected = True
                self._ready.set()
                backoff = _BACKOFF_FIRST
                if lost:
                    log.warning("LISTEN connection %s is back", self._where)
                    lost = False
                if not first:
                    self._callback(None)  # whatever was notified while not listening
                first = False
                while not self._stop.is_set():
                    for note in db.notifies(timeout=_STOP_CHECK):
                        if note.pid != self._own_pid():
                            flows = note.payload
                            self._callback(frozenset(flows.split(",")) if flows else None)
            except Exception as exc:
                self.connected = False
                if not self._stop.is_set() and not lost:
                    lost = True
                    log.warning(
                        "lost the LISTEN connection %s (%s); polling for work from other "
                        "processes until it is back", self._where, self._redact(_first_line(exc)),
                    )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            finally:
                self.connected = False
                db.close()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
