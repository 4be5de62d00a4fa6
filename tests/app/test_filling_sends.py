"""A client of a fill in flight gets the spool's bytes; a small blob's go from the loop,
without the pool thread's sender (and its duplicated socket) that a big one needs. (A blob
of at most ``SMALL_FILL`` bytes is held in memory, not spooled: from the loop as well.)"""

from __future__ import annotations

import asyncio
import os

import pytest

from proxy.http import filesend
from proxy.resources import PULLTHROUGH
from storage.oci.digest import Digest
from tests.support.fake_upstream import Fault, digest_of

REPOSITORY = "team/app"


@pytest.mark.parametrize(("size", "senders"), [(48 * 1024, 0), (100 * 1024, 0), (200 * 1024, 1), (3 * 1024 * 1024, 1)])
async def test_a_fill_in_flight_is_sent_from_the_loop_when_small(fake, proxy, monkeypatch, size, senders):
    made: list[filesend.FileSender] = []

    class Counted(filesend.FileSender):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(filesend, "FileSender", Counted)
    blob = os.urandom(size)
    layer = digest_of(blob)
    fake.blobs[(REPOSITORY, layer)] = blob
    gate = asyncio.Event()
    fake.faults[layer] = Fault("hold", gate=gate, times=1)
    fills = proxy.server.app[PULLTHROUGH].fills
    first = asyncio.ensure_future(proxy.get(f"/v2/{REPOSITORY}/blobs/{layer}"))
    while fills.get(Digest.parse(layer)) is None:  # the client's GET started it
        await asyncio.sleep(0.01)
    gate.set()
    response = await first
    assert response.status == 200
    assert await response.read() == blob
    assert len(made) == senders
