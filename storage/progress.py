"""How far a spool file is written, for readers on any thread.

A fill's first client is sent the spool's bytes as they land. Told on the event
loop, each landed batch would cost the loop a wake-up and the sending thread a
hand-off there and back before it could send; told here, the thread that wrote
the batch wakes the thread that sends it, and the loop is not in the way.

The spool's last byte is readable only once the blob is verified: a reader never
sees the clean end of a wrong body.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

from storage.errors import SpoolAborted


class SpoolProgress:
    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._landed = 0
        self._verified = False
        self._aborted = False

    def reach(self, landed: int) -> None:
        """The spool holds its first ``landed`` bytes (a smaller figure than before changes nothing)."""
        with self._changed:
            if landed > self._landed:
                self._landed = landed
                self._changed.notify_all()

    def verify(self) -> None:
        """The spool holds exactly the blob: its last byte may be read too."""
        with self._changed:
            self._verified = True
            self._changed.notify_all()

    def abort(self) -> None:
        """Nothing more will land: readers waiting for more give up."""
        with self._changed:
            self._aborted = True
            self._changed.notify_all()

    @property
    def verified(self) -> bool:
        return self._verified

    @property
    def aborted(self) -> bool:
        return self._aborted

    def available(self) -> tuple[int, bool]:
        """Now: how many bytes may be read, and whether that is all of them (verified)."""
        with self._changed:
            return self._readable(), self._verified

    def readable(self, past: int, timeout: float) -> tuple[int, bool] | None:
        """Blocking, at most ``timeout`` seconds: once more than ``past`` bytes may be read, or
        the blob is verified, how many may be and whether that is all of them (verified).
        None on the timeout (to look at a stop flag, say); raises ``SpoolAborted`` if the
        spool will never be the blob."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._readable() > past or self._verified or self._aborted,
                                          timeout):
                return None
            if self._aborted and not self._verified:
                raise SpoolAborted("the blob's fill failed")
            return self._readable(), self._verified

    def _readable(self) -> int:
        return self._landed if self._verified else self._landed - 1


class SpoolFollower(NamedTuple):
    """A spool as one sending thread follows it: the bytes of ``fd`` up to what ``progress``
    says may be read (``SpoolProgress``)."""

    fd: int
    progress: SpoolProgress
    # ``fd`` opened with O_DIRECT, for large reads once ``direct()`` says some of the spool
    # was written around the page cache (storage.directio); None: read ``fd``.
    direct_fd: int | None
    direct: Callable[[], bool]
