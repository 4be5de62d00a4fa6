"""The "notify-hung" case: does a hung notification endpoint slow a pull?

Two regcache processes in front of the same upstream, alike but for one thing:
the second posts notifications to an endpoint that accepts connections and never
answers (``timeout`` 1 h, so its one POST stays open and every later event meets a
full queue). Cold and warm skopeo pulls of the many-layer image alternate between
the two (each first in turn), best of ``repeats``. The figure to read is the ratio: 1.0 means the
endpoint costs a pull nothing.
"""

from __future__ import annotations

import socket
import threading

from bench.cases import Bench, _pull_seconds
from bench.peers import Regcache
from bench.report import Row, seconds


class HungEndpoint:
    """Accepts connections and holds them, reading and answering nothing."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/events"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:  # closed
                return
            self._held.append(connection)

    def close(self) -> None:
        self._server.close()
        for connection in self._held:
            connection.close()


def notify_hung(b: Bench) -> list[Row]:
    hung = HungEndpoint()
    endpoint = {"name": "hung", "url": hung.url, "timeout": "1h", "queue_size": 100}
    plain = Regcache(b.workdir / "notify-plain", b.upstream.url)
    notifying = Regcache(b.workdir / "notify-hung", b.upstream.url,
                         settings={"notifications": {"endpoints": [endpoint]}})
    started: list[Regcache] = []
    try:
        started += [plain.start(), notifying.start()]
        figures: dict[tuple[str, str], list[float]] = {}
        peers = [("plain", plain), ("hung", notifying)]
        for repeat in range(b.repeats):
            # Each goes first in turn: the first pull after a reset meets a quieter page cache.
            for name, peer in peers if repeat % 2 == 0 else peers[::-1]:
                peer.reset()
                figures.setdefault((name, "cold"), []).append(_pull_seconds(b, peer.host, b.small))
                figures.setdefault((name, "warm"), []).append(_pull_seconds(b, peer.host, b.small))
        layers = len(b.small.blob_digests) - 1
        rows = []
        for state in ("cold", "warm"):
            mine, anchor = min(figures[("hung", state)]), min(figures[("plain", state)])
            rows.append(Row(f"skopeo pull, {layers} small layers, {state}, notification endpoint hung",
                            mine, seconds(mine), "regcache, no endpoint", anchor, seconds(anchor),
                            target=("<=", 1.1)))
        return rows
    finally:
        for peer in reversed(started):
            peer.stop()
        hung.close()
