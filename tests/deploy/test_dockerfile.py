"""The container image (Dockerfile), against the package it installs and the chart that runs it.

No docker engine here: the Dockerfile is read, not built. What can be proven without one is: it is
multi-stage on python:3.11-slim, runs as a numeric non-root user (the chart's runAsUser), starts the
same console script the package declares with arguments regcache's own parser accepts, and the files
its build stage copies (after .dockerignore) make an installable package with every module.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

from proxy.cli.main import build_parser
from tests.support.helm import pod_spec, render

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_runs_the_command_the_chart_runs() -> None:
    stages = parse_dockerfile(ROOT / "Dockerfile")
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    assert final["FROM"][0].split()[0] in {"python:3.11-slim", "${PYTHON_IMAGE}"}
    assert "python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    user = final["USER"][-1].split(":")[0]
    # Numeric, or kubelet cannot prove runAsNonRoot; the chart's pod runs as the same user.
    assert user.isdigit() and int(user) != 0
    pod = pod_spec(render())
    assert pod["securityContext"]["runAsUser"] == int(user)
    entrypoint = json.loads(final["ENTRYPOINT"][-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["regcache"] and scripts["regcache"] == "proxy.cli.main:main"
    (container,) = pod["containers"]
    assert "command" not in container  # the chart keeps the image's entrypoint
    for args in (json.loads(final["CMD"][-1]), container["args"]):
        assert build_parser().parse_args(args).verb == "serve"


def test_the_image_build_context_holds_an_installable_package(tmp_path: Path) -> None:
    """The files the build stage COPYs, filtered by .dockerignore, make a package with every module."""
    stages = parse_dockerfile(ROOT / "Dockerfile")
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    context = tmp_path / "context"
    for copy_args in stages[0]["COPY"]:
        *sources, _ = shlex.split(copy_args)
        for source in sources:
            path = ROOT / source
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            assert files, f"COPY {source}: nothing there"
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if not ignored(relative, ignore):
                    (context / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, context / relative)
    assert not list(context.rglob("__pycache__"))
    # An sdist needs what a wheel needs from the tree (metadata, readme, every package) and no
    # `wheel` package, which this interpreter's setuptools would want for bdist_wheel. It is built
    # with that setuptools, so that one must be what the build asks for (`pip install -e .[test]`).
    (required,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    requirement = Requirement(required)
    assert requirement.specifier.contains(version(requirement.name)), f"the build needs {requirement}"
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    built = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=context,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    with tarfile.open(tmp_path / "dist" / built.stdout.split()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert "README.md" in names and "proxy/cli/main.py" in names
    packages = [init.parent.relative_to(ROOT).as_posix() for top in ("config", "proxy", "storage")
                for init in (ROOT / top).rglob("__init__.py")]
    assert len(packages) > 10
    for package in packages:
        assert f"{package}/__init__.py" in names


def parse_dockerfile(path: Path) -> list[dict[str, list[str]]]:
    """Instructions by stage: [{"FROM": [...], "COPY": [...], ...}, ...]; continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[dict[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append({})
        elif not stages:
            assert instruction == "ARG", f"{instruction} before FROM"
            continue
        if instruction == "COPY" and rest.startswith("--from"):
            instruction = "COPY --from"
        stages[-1].setdefault(instruction, []).append(rest.strip())
    return stages


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule for the patterns used here: the last pattern matching the path or a parent wins."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch(prefix, pattern) and prefix.count("/") == pattern.count("/") for prefix in prefixes)
        if hit:
            result = not negate
    return result
