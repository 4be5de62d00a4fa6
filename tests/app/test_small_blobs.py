"""A small blob on its first pull: gathered whole, verified, then sent with its headers in one write.

A blob of at most ``proxy.pull.fills.SMALL_FILL`` bytes is not spooled: the fill holds it in
memory until its digest is checked, so its client gets either the whole verified blob, with
the headers in the same write, or an error answer (never the start of a wrong body).
"""

from __future__ import annotations

import os

from aiohttp import http_writer

from proxy.pull.fills import SMALL_FILL
from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import Fault, digest_of

REPOSITORY = "team/app"
SMALL = os.urandom(SMALL_FILL - 1000)


async def test_a_small_blob_the_upstream_corrupts_is_a_bad_gateway_answer_and_is_not_kept(fake, proxy, tmp_path):
    fake.add_image(REPOSITORY, "1", [SMALL])
    layer = digest_of(SMALL)
    fake.faults[layer] = Fault("corrupt", times=1)
    r = await proxy.get(f"/v2/{REPOSITORY}/blobs/{layer}")
    assert r.status == 502, "the upstream's fault, not the client's"
    error = (await r.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE" and layer in error["message"]
    await proxy.server.app[PULLTHROUGH].fills.settle()
    assert list((tmp_path / "data" / "tmp").iterdir()) == []
    # Nothing of it was kept: the next GET fetches again and gets the right bytes.
    r = await proxy.get(f"/v2/{REPOSITORY}/blobs/{layer}")
    assert r.status == 200 and await r.read() == SMALL
    assert fake.count("GET", f"/blobs/{layer}") == 2


async def test_a_small_blob_leaves_with_its_headers_in_one_write(fake, proxy, monkeypatch):
    writes: list[bytes] = []  # what regcache's server wrote to its clients, a write each
    write, writelines = http_writer.StreamWriter._write, http_writer.StreamWriter._writelines

    def ours(writer: http_writer.StreamWriter) -> bool:  # not the fake upstream's, nor the client's
        return writer.transport is not None and writer.transport.get_extra_info("sockname")[1] == proxy.server.port

    def recorded_write(self, chunk):  # type: ignore[no-untyped-def]
        if ours(self):
            writes.append(bytes(chunk))
        return write(self, chunk)

    def recorded_writelines(self, chunks):  # type: ignore[no-untyped-def]
        chunks = list(chunks)
        if ours(self):
            writes.append(b"".join(chunks))
        return writelines(self, chunks)

    monkeypatch.setattr(http_writer.StreamWriter, "_write", recorded_write)
    monkeypatch.setattr(http_writer.StreamWriter, "_writelines", recorded_writelines)
    fake.add_image(REPOSITORY, "1", [SMALL])
    layer = digest_of(SMALL)
    r = await proxy.get(f"/v2/{REPOSITORY}/blobs/{layer}")
    assert r.status == 200 and await r.read() == SMALL
    assert len(writes) == 1, "headers and body in one write"
    assert writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(SMALL)
    await proxy.server.app[PULLTHROUGH].fills.settle()
