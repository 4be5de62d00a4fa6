"""The subset of Go templates that docker's ``--format`` flags are used with.

Supported: literal text, ``{{.Field}}``, ``{{json .}}``, ``{{json .Field}}``,
``{{upper .Field}}`` / ``{{lower .Field}}``, ``{{-``/``-}}`` trimming, the
``table`` prefix (a header row, columns aligned as Go's tabwriter with
docker's settings: minimum width 10, padding 3) and the escapes ``\\t`` and
``\\n`` written literally on a command line. Anything else is an error that
names the template, as docker's is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

TABLE_PREFIX = "table"
_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
_FIELD = re.compile(r"^\.([A-Za-z_][A-Za-z0-9_]*)$")


class TemplateError(ValueError):
    pass


class Template:
    def __init__(self, text: str) -> None:
        self.source = text
        stripped = text.strip(" ")
        self.is_table = stripped == TABLE_PREFIX or stripped.startswith(TABLE_PREFIX + " ")
        if self.is_table:
            stripped = stripped[len(TABLE_PREFIX) :]
        body = stripped.strip(" ").replace("\\t", "\t").replace("\\n", "\n")
        self._parts = self._parse(body)

    def _parse(self, body: str) -> list[tuple[str, str, str | None]]:
        """(kind, text or function, field) items: kind is "text" or "call"."""
        parts: list[tuple[str, str, str | None]] = []
        pos = 0
        pending_trim = False
        for match in _ACTION.finditer(body):
            text = body[pos : match.start()]
            if pending_trim:
                text = text.lstrip()
            if match.group(1):
                text = text.rstrip()
            if text:
                parts.append(("text", text, None))
            parts.append(self._action(match.group(2)))
            pending_trim = bool(match.group(3))
            pos = match.end()
        rest = body[pos:]
        if "{{" in rest or "}}" in rest:
            raise TemplateError(f"template: unclosed action in {self.source!r}")
        if pending_trim:
            rest = rest.lstrip()
        if rest:
            parts.append(("text", rest, None))
        return parts

    def _action(self, action: str) -> tuple[str, str, str | None]:
        words = action.split()
        if len(words) == 1 and _FIELD.match(words[0]):
            return ("call", "", words[0][1:])
        if len(words) == 2 and words[0] in ("json", "upper", "lower", "title"):
            if words[1] == ".":
                if words[0] != "json":
                    raise TemplateError(f'template: {words[0]} needs a field, not "." in {self.source!r}')
                return ("call", "json", None)
            if _FIELD.match(words[1]):
                return ("call", words[0], words[1][1:])
        raise TemplateError(f'template: unsupported action "{{{{{action}}}}}" in {self.source!r}')

    def fields(self) -> list[str]:
        return [field for kind, _, field in self._parts if kind == "call" and field]

    def render(self, row: Mapping[str, Any]) -> str:
        out = []
        for kind, text, field in self._parts:
            if kind == "text":
                out.append(text)
                continue
            if field is not None and field not in row:
                raise TemplateError(f"template: can't evaluate field {field} in {self.source!r}")
            value = row if field is None else row[field]
            if text == "json":
                out.append(json.dumps(value, sort_keys=True, separators=(",", ":")))
            elif text == "upper":
                out.append(_text(value).upper())
            elif text == "lower":
                out.append(_text(value).lower())
            elif text == "title":
                out.append(_text(value).title())
            else:
                out.append(_text(value))
        return "".join(out)


def _text(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(_text(v) for v in value) + "]"
    return str(value)


def tabwrite(lines: Sequence[str], minwidth: int = 10, padding: int = 3) -> str:
    """Go's ``text/tabwriter`` as docker configures it: tab-terminated cells are aligned
    per column over each run of lines that have that column; the last cell is free."""
    rows = [line.split("\t") for line in lines]
    widths: list[list[int]] = [[0] * (len(r) - 1) for r in rows]
    column = 0
    while True:
        i = 0
        found = False
        while i < len(rows):
            if len(rows[i]) - 1 <= column:
                i += 1
                continue
            found = True
            start = i
            width = minwidth
            while i < len(rows) and len(rows[i]) - 1 > column:
                width = max(width, len(rows[i][column]) + padding)
                i += 1
            for j in range(start, i):
                widths[j][column] = width
        if not found:
            break
        column += 1
    out = []
    for row, row_widths in zip(rows, widths, strict=True):
        cells = [cell.ljust(row_widths[k]) for k, cell in enumerate(row[:-1])]
        out.append("".join(cells) + row[-1])
    return "\n".join(out) + ("\n" if out else "")


def render_all(template: Template, rows: Sequence[Mapping[str, Any]], headers: Mapping[str, str]) -> str:
    """Every row through the template; a table gets a header row and aligned columns."""
    lines = [template.render(row) for row in rows]
    if not template.is_table:
        return "".join(line + "\n" for line in lines)
    header_row = {key: headers.get(key, key.upper()) for key in {*headers, *template.fields()}}
    header = template.render(header_row) if template.fields() or not rows else None
    all_lines = ([header] if header is not None else []) + lines
    return tabwrite("\n".join(all_lines).split("\n"))
