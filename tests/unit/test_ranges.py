"""Range headers parsed and resolved as RFC 9110 section 14 says, checked against a plain model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import RangeNotSatisfiable
from proxy.http import ranges
from proxy.http.ranges import ByteRange, Multipart, RangeSpec


@pytest.mark.parametrize(
    ("value", "specs"),
    [
        ("bytes=0-9", [RangeSpec(0, 9)]),
        ("Bytes = 5-", None),  # no whitespace around "=" in the grammar
        ("BYTES=5-", [RangeSpec(5, None)]),
        ("bytes=-4096", [RangeSpec(None, 4096)]),
        ("bytes=0-9, 20-29 ,,-1", [RangeSpec(0, 9), RangeSpec(20, 29), RangeSpec(None, 1)]),
        ("bytes=0-" + "9" * 5000, [RangeSpec(0, 10**19)]),
        ("bytes=9-0", None),
        ("bytes=-", None),
        ("bytes=1-2-3", None),
        ("bytes=a-5", None),
        ("bytes=²-5", None),
        ("items=0-5", None),
        ("bytes=", None),
        ("bytes=" + ",".join(["0-0"] * (ranges.MAX_RANGES + 1)), None),
    ],
)
def test_parse(value: str, specs: list[RangeSpec] | None) -> None:
    parsed = ranges.parse(value)
    assert (None if parsed is None else list(parsed)) == specs


def test_max_ranges_are_honoured() -> None:
    parsed = ranges.parse("bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(ranges.MAX_RANGES)))
    assert parsed is not None and len(parsed) == ranges.MAX_RANGES


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        ("bytes=0-9", 100, [ByteRange(0, 10)]),
        ("bytes=90-200", 100, [ByteRange(90, 10)]),
        ("bytes=-10", 100, [ByteRange(90, 10)]),
        ("bytes=-1000", 100, [ByteRange(0, 100)]),
        ("bytes=100-,0-0", 100, [ByteRange(0, 1)]),  # the unsatisfiable one is dropped
        ("bytes=50-59,0-9", 100, [ByteRange(50, 10), ByteRange(0, 10)]),  # order kept
        ("bytes=50-59,0-9,55-64", 100, [ByteRange(0, 10), ByteRange(50, 15)]),  # overlaps coalesced
        ("bytes=0-9,10-19", 100, [ByteRange(0, 10), ByteRange(10, 10)]),  # adjacent is not overlapping
    ],
)
def test_resolve(value: str, size: int, expected: list[ByteRange]) -> None:
    parsed = ranges.parse(value)
    assert parsed is not None
    assert ranges.resolve(parsed, size) == expected


@pytest.mark.parametrize(("value", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-0", 0)])
def test_unsatisfiable(value: str, size: int) -> None:
    parsed = ranges.parse(value)
    assert parsed is not None
    with pytest.raises(RangeNotSatisfiable) as raised:
        ranges.resolve(parsed, size)
    assert raised.value.size == size


SPECS = st.lists(
    st.one_of(
        st.builds(lambda a, n: RangeSpec(a, None if n is None else a + n), st.integers(0, 300),
                  st.one_of(st.none(), st.integers(0, 300))),
        st.builds(lambda n: RangeSpec(None, n), st.integers(0, 300)),
    ),
    min_size=1,
    max_size=12,
)


def _model(spec: RangeSpec, size: int) -> set[int]:
    if spec.first is None:
        assert spec.last is not None
        return set(range(max(size - spec.last, 0), size))
    last = size - 1 if spec.last is None else min(spec.last, size - 1)
    return set(range(spec.first, last + 1))


@given(specs=SPECS, size=st.integers(0, 400))
def test_resolved_ranges_carry_exactly_the_bytes_asked_for_once(specs: list[RangeSpec], size: int) -> None:
    wanted = set().union(*(_model(s, size) for s in specs))
    try:
        resolved = ranges.resolve(tuple(specs), size)
    except RangeNotSatisfiable:
        assert not wanted
        return
    carried = [i for r in resolved for i in range(r.start, r.stop)]
    assert all(r.length >= 1 for r in resolved)
    assert sorted(carried) == sorted(wanted)  # every byte asked for, none twice


@given(specs=SPECS, size=st.integers(1, 400))
def test_multipart_length_is_the_length_of_its_framing(specs: list[RangeSpec], size: int) -> None:
    try:
        resolved = ranges.resolve(tuple(specs), size)
    except RangeNotSatisfiable:
        return
    multipart = Multipart(resolved, size)
    body = b"".join(head + b"x" * r.length for head, r in zip(multipart.heads, resolved, strict=True))
    assert len(body + multipart.tail) == multipart.content_length
