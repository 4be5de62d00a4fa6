"""How far a spool is written, as readers on other threads see it."""

from __future__ import annotations

import threading

import pytest

from storage.errors import SpoolAborted
from storage.progress import SpoolProgress


def test_the_last_landed_byte_waits_for_the_digest() -> None:
    progress = SpoolProgress()
    progress.reach(100)
    assert progress.available() == (99, False)
    assert progress.readable(0, 1) == (99, False)
    assert progress.readable(99, 0.05) is None, "nothing past the held-back byte until verified"
    progress.verify()
    assert progress.available() == (100, True)
    assert progress.readable(99, 1) == (100, True)


def test_a_smaller_figure_changes_nothing() -> None:
    progress = SpoolProgress()
    progress.reach(100)
    progress.reach(40)  # the loop telling what the writing thread told already
    assert progress.readable(0, 1) == (99, False)


def test_a_reader_wakes_when_the_writer_tells_it() -> None:
    progress = SpoolProgress()
    threading.Timer(0.05, progress.reach, args=(10,)).start()
    assert progress.readable(0, 10) == (9, False)


def test_an_aborted_spool_fails_its_readers_unless_it_was_verified() -> None:
    progress = SpoolProgress()
    progress.reach(100)
    threading.Timer(0.05, progress.abort).start()
    with pytest.raises(SpoolAborted):
        progress.readable(99, 10)
    verified = SpoolProgress()
    verified.reach(100)
    verified.verify()
    verified.abort()  # a commit that failed after the digest matched: readers still get the blob
    assert verified.readable(0, 1) == (100, True)


def test_a_verified_spool_answers_at_once_even_with_nothing_more() -> None:
    progress = SpoolProgress()
    progress.reach(10)
    progress.verify()
    assert progress.readable(10, 0) == (10, True)
