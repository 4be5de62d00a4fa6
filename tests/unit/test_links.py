"""The links PullThrough remembers, with the sizes their descriptors gave."""

from __future__ import annotations

from proxy.pull.links import Links


def test_a_descriptor_size_known_first_stays_and_the_stored_size_replaces_it():
    links = Links()
    links.add(1, "sha256:a")
    assert (1, "sha256:a") in links and links.size(1, "sha256:a") is None
    links.add(1, "sha256:a", 10)
    links.add(1, "sha256:a", 11)  # as the index keeps the first descriptor's
    links.add(1, "sha256:a")
    assert links.size(1, "sha256:a") == 10
    links.add(1, "sha256:a", 12, stored=True)
    assert links.size(1, "sha256:a") == 12
    assert links.size(2, "sha256:a") is None and (2, "sha256:a") not in links


def test_past_the_limit_the_map_starts_over():
    links = Links(limit=2)
    links.add(1, "a", 1)
    links.add(1, "b", 2)
    links.add(1, "b", 3, stored=True)  # known already: nothing is dropped
    assert (1, "a") in links
    links.add(1, "c", 3)
    assert (1, "a") not in links and links.size(1, "c") == 3
