"""storage.jobs: blocking jobs on threads of their own, as a fill's commit runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from storage.jobs import Jobs


async def test_a_job_runs_on_another_thread_and_gives_back_its_result_or_its_error():
    jobs = Jobs("test-jobs", max_threads=2)
    assert await jobs.run(threading.get_ident) != threading.get_ident()

    def fail() -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await jobs.run(fail)
    assert await jobs.run(lambda: 42) == 42


async def test_jobs_run_side_by_side_up_to_the_limit_and_the_rest_wait():
    jobs = Jobs("test-jobs", max_threads=2)
    release = threading.Event()
    running: list[int] = []

    def blocked() -> int:
        running.append(threading.get_ident())
        release.wait(10)
        return len(running)

    waiting = [asyncio.ensure_future(jobs.run(blocked)) for _ in range(3)]
    for _ in range(200):
        if len(running) == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert len(running) == 2, "a third thread is not started past the limit"
    release.set()
    assert sorted(await asyncio.gather(*waiting))[-1] == 3
    assert len(set(running)) == 2


async def test_a_job_whose_waiter_is_cancelled_still_runs_to_its_end():
    jobs = Jobs("test-jobs", max_threads=1)
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(10)
        done.set()

    task = asyncio.ensure_future(jobs.run(job))
    while not started.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await jobs.run(done.is_set), "the next job runs after it, on the same thread"


def test_a_job_that_ends_after_its_loop_closed_leaves_its_thread_working():
    jobs = Jobs("test-jobs", max_threads=1)
    release = threading.Event()
    loop = asyncio.new_event_loop()
    try:
        waiting = loop.create_task(jobs.run(lambda: release.wait(10)))
        loop.run_until_complete(asyncio.sleep(0.05))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(waiting)
    finally:
        loop.close()
    release.set()  # the job ends now, its loop gone
    assert asyncio.run(asyncio.wait_for(jobs.run(lambda: "next"), 10)) == "next"
