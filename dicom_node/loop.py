"""The background-loop base shared by completion, the worker and delivery.

Each of them is "do one pass, wait, repeat" on a daemon thread: :meth:`PollingLoop.poll` does one
pass and returns True when it found work (then the next pass runs at once). An exception in a pass
is logged and the loop goes on: one bad study or a briefly locked database must never end a
service for good. :meth:`wake` runs the next pass now instead of after ``poll_seconds``.
"""

from __future__ import annotations

import logging
import threading
from typing import TypeVar

log = logging.getLogger(__name__)

_L = TypeVar("_L", bound="PollingLoop")


class PollingLoop:
    """Base class: subclasses implement :meth:`poll`."""

    name = "loop"

    def __init__(self, poll_seconds: float) -> None:
        self.poll_seconds = float(poll_seconds)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> bool:
        """One pass; True if it did work and the next pass should follow at once."""
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (a long pass may end early)."""
        return self._stop.is_set()

    def start(self: _L) -> _L:
        """Start the thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Let the current pass finish, then stop; waits up to ``timeout`` seconds."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Run the next pass now."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.poll()
            except Exception:  # a bad pass must not end the loop for good
                log.exception("%s pass failed; retrying in %.1f s", self.name, self.poll_seconds)
                busy = False
            if not busy and not self._stop.is_set():
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
