"""docker's pull progress display, fed with the JSON lines the server streams.

On a terminal every layer keeps its own line, redrawn in place with a bar, as
docker's ``jsonmessage`` does; piped, progress updates are dropped and each
status change is one plain ``<id>: <status>`` line.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, Any

from proxy.cli.client import AdminClientError
from proxy.cli.docker_format import human_size

BAR_WIDTH = 50


def progress_bar(current: int, total: int) -> str:
    if total <= 0:
        return human_size(current)
    filled = min(BAR_WIDTH, int(BAR_WIDTH * current / total))
    arrow = ">" if filled < BAR_WIDTH else ""
    bar = "=" * filled + arrow + " " * (BAR_WIDTH - filled - len(arrow))
    return f"[{bar}]  {human_size(current)}/{human_size(total)}"


class _Terminal:
    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.lines: dict[str, int] = {}  # id -> its line, counted from the top of the display

    def show(self, message: dict[str, Any]) -> None:
        ident = message.get("id")
        text = message.get("status", "")
        detail = message.get("progressDetail")
        if detail:
            text = f"{text} {progress_bar(int(detail.get('current', 0)), int(detail.get('total', 0)))}"
        if not ident:
            self.out.write(f"{text}\n")
            self.lines = {}  # what follows starts below this line
            return
        if ident not in self.lines:
            self.lines[ident] = len(self.lines)
            self.out.write(f"\x1b[2K{ident}: {text}\n")
        else:
            up = len(self.lines) - self.lines[ident]
            self.out.write(f"\x1b[{up}A\x1b[2K\r{ident}: {text}\r\x1b[{up}B")
        self.out.flush()


def show_pull(messages: Iterable[dict[str, Any]], out: IO[str], *, quiet: bool = False) -> int:
    terminal = _Terminal(out) if out.isatty() and not quiet else None
    final = None
    for message in messages:
        if "error" in message:
            raise AdminClientError(str(message["error"]))
        status = str(message.get("status", ""))
        if status.startswith("Status: "):
            final = status.rsplit(" for ", 1)[-1]
        if quiet:
            continue
        if terminal is not None:
            terminal.show(message)
        elif not message.get("progressDetail"):
            ident = message.get("id")
            out.write(f"{ident}: {status}\n" if ident else f"{status}\n")
            out.flush()
    if final is None:
        raise AdminClientError("the server ended the pull without a result")
    if quiet:
        out.write(final + "\n")
    return 0
