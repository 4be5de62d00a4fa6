"""docker's output rules as regcache renders them: units, templates, tab alignment, pull progress.

The real dockerd comparison lives in test_admin_docker.py; these pin down the edges it does not
reach (units at their boundaries, template errors, the terminal progress display).
"""

from __future__ import annotations

import io

import pytest

from proxy.admin.query import glob_regex
from proxy.cli.client import AdminClientError
from proxy.cli.docker_format import human_duration, human_size, image_rows
from proxy.cli.gotemplate import Template, TemplateError, render_all, tabwrite
from proxy.cli.progress import show_pull


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0B"), (999, "999B"), (1000, "1kB"), (1234, "1.23kB"), (999_499, "999kB"), (999_500, "1e+03kB"),
     (5_600_000, "5.6MB"), (72_800_000, "72.8MB"), (1_234_567_890, "1.23GB")],
)
def test_sizes_are_go_units_with_three_digits(size, shown):
    assert human_size(size) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.5, "Less than a second"), (1, "1 second"), (59, "59 seconds"), (60, "About a minute"),
     (3599, "59 minutes"), (3600, "About an hour"), (47 * 3600, "47 hours"), (48 * 3600, "2 days"),
     (14 * 86400, "2 weeks"), (61 * 86400, "2 months"), (800 * 86400, "2 years")],
)
def test_durations_are_go_units(seconds, shown):
    assert human_duration(seconds) == shown


def test_tabwriter_aligns_as_docker_configures_it():
    # minimum width 10, padding 3, the last cell free
    assert tabwrite(["A\tBBBBBBBBBBBB\tC", "DDD\tE\tF"]) == "A         BBBBBBBBBBBB   C\nDDD       E              F\n"


def test_templates_render_fields_json_and_tables():
    rows = [{"ID": "abc", "Repository": "x", "Tag": "1"}]
    assert render_all(Template("{{.ID}}\\t{{.Repository}}"), rows, {}) == "abc\tx\n"
    assert render_all(Template("{{json .Tag}} {{upper .Repository}}"), rows, {}) == '"1" X\n'
    assert render_all(Template("{{json .}}"), rows, {}) == '{"ID":"abc","Repository":"x","Tag":"1"}\n'
    table = render_all(Template("table {{.ID}}\\t{{.Tag}}"), rows, {"ID": "IMAGE ID", "Tag": "TAG"})
    assert table == "IMAGE ID   TAG\nabc        1\n"
    for bad in ("{{.ID", "{{index .ID 1}}", "{{upper .}}"):
        with pytest.raises(TemplateError):
            Template(bad)
    with pytest.raises(TemplateError, match="can't evaluate field Nope"):
        Template("{{.Nope}}").render(rows[0])


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [("*x:*", "box:1", True), ("*x:*", "cmp/x:1", False), ("*/x:*", "cmp/x:1", True), ("cmp/?", "cmp/x", True),
     ("cmp/[a-x]", "cmp/x", True), ("cmp/[^x]", "cmp/x", False), ("a\\*", "a*", True), ("a\\*", "ab", False)],
)
def test_reference_globs_are_go_path_match(pattern, name, matches):
    assert bool(glob_regex(pattern).fullmatch(name)) is matches


def test_rows_follow_docker_for_tags_digests_and_dangling():
    image = {"Id": "sha256:" + "a" * 64, "RepoTags": ["x:1", "x:2"], "RepoDigests": ["x@sha256:" + "d" * 64],
             "Created": 0, "Size": 1}
    plain = [(r["Repository"], r["Tag"], r["Digest"]) for r in image_rows([image], digests=False, no_trunc=False)]
    assert plain == [("x", "1", "<none>"), ("x", "2", "<none>")]
    with_digests = image_rows([image], digests=True, no_trunc=False)
    assert {r["Digest"] for r in with_digests} == {"sha256:" + "d" * 64}
    dangling = {**image, "RepoTags": []}
    assert [(r["Repository"], r["Tag"]) for r in image_rows([dangling], digests=False, no_trunc=False)] == [
        ("x", "<none>")
    ]
    assert image_rows([dangling], digests=False, no_trunc=False)[0]["ID"] == "a" * 12



def test_the_last_puller_column_is_on_request_and_na_before_any_client_pulled():
    from proxy.cli.docker_format import IMAGE_HEADERS, default_images_format

    images = [{"Id": "sha256:" + "a" * 64, "RepoTags": ["x:1"], "LastPulled": 1, "LastPulledBy": "user:alice"},
              {"Id": "sha256:" + "b" * 64, "RepoTags": ["y:1"], "LastPulled": 0, "LastPulledBy": None}]
    rows = image_rows(images, digests=False, no_trunc=False, now=3600)
    assert "LastPulledBy" not in Template(default_images_format(digests=False, quiet=False,
                                                                show_platforms=False)).fields()
    table = render_all(Template(default_images_format(digests=False, quiet=False, show_platforms=False,
                                                      pulled_by=True)), rows, IMAGE_HEADERS)
    lines = table.splitlines()
    column = lines[0].index("LAST PULLED BY")
    assert [line[column:].split()[0] for line in lines[1:]] == ["user:alice", "N/A"]

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


PULL = [
    {"status": "Pulling from library/alpha", "id": "1"},
    {"status": "Pulling fs layer", "id": "aaaaaaaaaaaa"},
    {"status": "Pulling fs layer", "id": "bbbbbbbbbbbb"},
    {"status": "Downloading", "id": "aaaaaaaaaaaa", "progressDetail": {"current": 500, "total": 1000}},
    {"status": "Pull complete", "id": "aaaaaaaaaaaa"},
    {"status": "Already exists", "id": "bbbbbbbbbbbb"},
    {"status": "Digest: sha256:" + "d" * 64},
    {"status": "Status: Downloaded newer image for alpha:1"},
]


def test_pull_progress_redraws_layer_lines_on_a_terminal():
    out = _Tty()
    assert show_pull(PULL, out) == 0
    text = out.getvalue()
    assert "aaaaaaaaaaaa: Downloading [=========================>" in text and "500B/1kB" in text
    assert "\x1b[2A" in text  # back up two lines to redraw the first layer
    assert text.endswith("Status: Downloaded newer image for alpha:1\n")


def test_pull_progress_is_plain_lines_when_piped():
    out = io.StringIO()
    show_pull(PULL, out)
    assert out.getvalue().splitlines() == [
        "1: Pulling from library/alpha",
        "aaaaaaaaaaaa: Pulling fs layer",
        "bbbbbbbbbbbb: Pulling fs layer",
        "aaaaaaaaaaaa: Pull complete",
        "bbbbbbbbbbbb: Already exists",
        "Digest: sha256:" + "d" * 64,
        "Status: Downloaded newer image for alpha:1",
    ]
    with pytest.raises(AdminClientError, match="boom"):
        show_pull([PULL[0], {"error": "boom"}], io.StringIO())
