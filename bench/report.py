"""Result rows and the table they print as: regcache beside its anchor, ratio, target."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

MIB = 1024 * 1024

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / MIB:,.0f} MiB/s"


def seconds(value: float) -> str:
    return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"


def per_second(value: float) -> str:
    return f"{value:,.0f} req/s"


def megabytes(value: float) -> str:
    return f"{value / 1e6:,.0f} MB"


@dataclass(frozen=True)
class Row:
    """One comparison. ``compare`` is how the target is read: the ratio regcache/anchor
    (``ratio``), the difference regcache-anchor (``diff``), or regcache's figure alone
    (``value``); ``target`` is an operator and a number for that quantity."""

    case: str
    regcache: float
    shown: str
    anchor: str = "-"
    anchor_value: float | None = None
    anchor_shown: str = "-"
    compare: str = "ratio"
    target: tuple[str, float] | None = None
    note: str = ""
    target_label: str = ""  # how to print the target when the number alone reads badly

    @property
    def quantity(self) -> float | None:
        if self.compare == "value":
            return self.regcache
        if self.anchor_value is None:
            return None
        if self.compare == "diff":
            return self.regcache - self.anchor_value
        return self.regcache / self.anchor_value if self.anchor_value else None

    def quantity_text(self) -> str:
        q = self.quantity
        if q is None:
            return "-"
        if self.compare == "ratio":
            return f"{q:.2f}x"
        if self.compare == "diff":
            return f"{q * 1000:+.1f} ms"
        return self.shown

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        if self.target_label:
            return self.target_label
        op, bound = self.target
        if self.compare == "ratio":
            return f"{op} {bound:g}x"
        if self.compare == "diff":
            return f"{op} {bound * 1000:+g} ms"
        return f"{op} {bound:g}"

    @property
    def met(self) -> bool | None:
        q = self.quantity
        if self.target is None or q is None:
            return None
        op, bound = self.target
        return _OPS[op](q, bound)


HEADER = ("case", "regcache", "anchor", "anchor's figure", "ratio / diff", "target", "met")


def cells(row: Row) -> tuple[str, ...]:
    met = {True: "yes", False: "**no**", None: "-"}[row.met]
    case = f"{row.case} ({row.note})" if row.note else row.case
    return (case, row.shown, row.anchor, row.anchor_shown, row.quantity_text(), row.target_text(), met)


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def not_available(case: str, why: str) -> Row:
    return Row(case, 0.0, "not available", note=why, compare="value")
