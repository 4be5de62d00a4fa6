"""Tag list pages through regcache: every Link it sends can be followed to the end."""

from __future__ import annotations

import re

TAGS = ["a", "b", "c", "d", "e"]


async def follow(proxy, path: str) -> list[list[str]]:  # type: ignore[no-untyped-def]
    """Every page, following rel="next" Links until there is none."""
    pages = []
    while True:
        r = await proxy.get(path)
        assert r.status == 200, await r.text()
        pages.append((await r.json())["tags"])
        link = r.headers.get("Link")
        if link is None:
            return pages
        match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
        assert match is not None, link
        path = match.group(1)
        assert len(pages) <= len(TAGS), "the Links go round in circles"


async def test_upstream_pages_without_n_and_every_link_can_be_followed(fake, proxy):
    fake.add_image("team/app", TAGS[0], [b"layer"])
    fake.tags["team/app"] = list(TAGS)
    fake.tags_page = 2  # the upstream's own page size, used when the client sends no n
    pages = await follow(proxy, "/v2/team/app/tags/list")
    assert pages == [["a", "b"], ["c", "d"], ["e"]]


async def test_client_page_size_is_kept_in_the_links(fake, proxy):
    fake.add_image("team/app", TAGS[0], [b"layer"])
    fake.tags["team/app"] = list(TAGS)
    pages = await follow(proxy, "/v2/team/app/tags/list?n=3")
    assert pages == [["a", "b", "c"], ["d", "e"]]
