"""Repository globs and the policy over generated names: no rule is bypassed by spelling.

A rule is judged on the name routing produced, and routing accepts only names of the
distribution grammar; so every spelling a client might try to slip past a rule (upper
case, ``..``, ``%2F``, double or trailing slashes, a path prefix or ``?ns=``) either is
refused as a name or becomes the very name the rule is about.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.globs import check_glob, matches
from config.settings import Settings, UpstreamSettings
from proxy.access.policy import Identity, Policy
from proxy.pull.routing import Router
from storage.errors import NameInvalid

COMPONENT = st.from_regex(r"[a-z0-9]{1,4}(?:[._-][a-z0-9]{1,3})?", fullmatch=True)
NAMES = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)


def _glob_of(name: str, data: st.DataObject) -> str:
    """A glob that must match ``name``: some components become '*', a run of them '**'."""
    parts = name.split("/")
    out = [p if not data.draw(st.booleans()) else "*" for p in parts]
    if len(out) > 1 and data.draw(st.booleans()):
        start = data.draw(st.integers(1, len(out) - 1))
        out = [*out[:start], "**"]
    return "/".join(out)


@given(NAMES, st.data())
def test_a_glob_made_from_a_name_matches_it(name: str, data: st.DataObject) -> None:
    assert matches(_glob_of(name, data), name)


@given(NAMES, NAMES)
def test_a_literal_glob_matches_only_its_own_name(glob: str, name: str) -> None:
    assert matches(glob, name) == (glob == name)


@given(NAMES, COMPONENT)
def test_star_stays_in_one_component_and_double_star_needs_one_below(name: str, extra: str) -> None:
    first = name.split("/")[0]
    assert matches(f"{first}/**", f"{name}/{extra}")
    assert not matches(f"{first}/**", first)
    assert matches(f"{first}/*", f"{first}/{extra}")
    assert not matches(f"{first}/*", f"{first}/{extra}/{extra}")


@pytest.mark.parametrize("glob", ["Team/*", "team//app", "team/", "/team", "team/../x", "te**m/x", "team/a b", ""])
def test_globs_that_could_never_match_a_valid_name_are_refused_at_load(glob: str) -> None:
    with pytest.raises(ValueError):
        check_glob(glob)


def _spellings(name: str) -> st.SearchStrategy[str]:
    """What a client could send in the name part of a path instead of ``name``."""
    parts = name.split("/")
    return st.sampled_from([
        name.upper(),
        name[:1].upper() + name[1:],
        name + "/",
        name.replace("/", "//") if "/" in name else "/" + name,
        "/".join([*parts[:1], "..", *parts]),
        "./" + name,
        name.replace("/", "%2F") if "/" in name else name + "%2F",
        name.replace("/", "%2f") if "/" in name else "%2e%2e/" + name,
        name + "/.",
    ])


ROUTER = Router(
    [UpstreamSettings(name="private.example", url="http://127.0.0.1:1", default=True),
     UpstreamSettings(name="ghcr.io", url="http://127.0.0.1:2")],
    UpstreamSettings(name="private.example", url="http://127.0.0.1:1", default=True),
)


@settings(max_examples=300)
@given(NAMES, st.data())
def test_no_spelling_of_a_denied_name_routes_to_another_name_the_rule_misses(name: str, data: st.DataObject) -> None:
    spelled = data.draw(_spellings(name))
    policy = Policy(Settings(upstreams=[
        UpstreamSettings(name="private.example", url="http://127.0.0.1:1", default=True, deny=[name]),
        UpstreamSettings(name="ghcr.io", url="http://127.0.0.1:2", deny=[name]),
    ]))
    for candidate, ns in ((spelled, None), (spelled, "ghcr.io"), (f"ghcr.io/{spelled}", None)):
        try:
            route = ROUTER.resolve(candidate, ns)
        except NameInvalid:
            continue  # refused as a name: never reaches a rule, a lookup or the upstream
        # Whatever routing made of it is judged as what it is.
        decision = policy.decide(Identity("user", "x"), route.upstream_name, route.repository)
        assert decision.allowed == (route.repository != name)


@given(NAMES, NAMES)
def test_a_user_rule_never_grants_another_upstream_or_a_denied_name(allowed: str, other: str) -> None:
    settings_ = Settings.model_validate({
        "upstreams": [{"name": "a.example", "url": "http://127.0.0.1:1", "default": True, "deny": [f"{allowed}/**"]},
                      {"name": "b.example", "url": "http://127.0.0.1:2"}],
        "auth": {"tokens": ["t0ken-0123456789"]},
        "access": {"users": {"u": [{"upstream": "a.example", "repositories": [allowed, f"{allowed}/**"]}]}},
    })
    policy = Policy(settings_)
    user = Identity("user", "u")
    assert policy.decide(user, "a.example", allowed).allowed
    assert not policy.decide(user, "b.example", allowed).allowed
    assert not policy.decide(user, "a.example", f"{allowed}/{other}").allowed  # the deny list wins
    assert policy.decide(user, "a.example", other).allowed == (other == allowed)
    assert not policy.decide(Identity("user", "stranger"), "a.example", allowed).allowed
    assert not policy.decide(Identity("anonymous"), "a.example", allowed).allowed
