"""A fresh clone installs and tests with the README's two commands, and its dependencies coexist."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OPENCV_DISTRIBUTIONS = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}
"""Every OpenCV wheel on PyPI installs into the same ``cv2`` folder: two of them overwrite each other's files."""


def _readme_block(heading: str) -> list[str]:
    """The command lines of the first code block under ``## heading`` in the README."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.DOTALL)
    assert block is not None, f"README section {heading!r} has no code block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(extras: set[str]) -> set[str]:
    """Canonical names of every installed distribution that ``pip install -e ".[extras]"`` pulls in.

    posegen's own requirements come from ``pyproject.toml`` (the installed metadata may be another
    checkout's); the rest from each installed distribution's metadata, markers evaluated.
    """
    project = _pyproject()

    def own(wanted: set[str]) -> list[Requirement]:
        reqs = [Requirement(r) for r in project["dependencies"]]
        for extra in wanted:
            reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
        return reqs

    seen: set[str] = set()
    todo = own(extras)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == "posegen":
            todo += own(set(req.extras))
            continue
        if name in seen:
            continue
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return seen


def test_ci_runs_exactly_the_readme_install_and_test_commands() -> None:
    install, test = _readme_block("Install"), _readme_block("Test")
    assert install == ['python -m pip install -e ".[mediapipe,test]"']
    assert test == ["python -m pytest -q"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci.count(install[0]) == 1 and ci.count(test[0]) == 1
    assert ci.index("python -m pip install torch==2.13.0") < ci.index(install[0]) < ci.index(test[0])


def test_the_test_extra_brings_every_library_the_suite_imports() -> None:
    """The README's install command makes its test command work: no import in tests/ is left to chance."""
    installed = _closure({"mediapipe", "test"})
    assert {"pytest", "mediapipe"} <= installed
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {"posegen_cli"}
    providers = md.packages_distributions()
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - local - set(sys.stdlib_module_names) - {"__future__"}:
                dists = {canonicalize_name(d) for d in providers.get(top, [])}
                assert dists & installed, f"{path.name} imports {top}, which no requirement of posegen[mediapipe,test] installs"


def test_exactly_one_opencv_distribution_with_the_mediapipe_extra() -> None:
    """posegen asks for the OpenCV wheel mediapipe itself requires, so the extra adds no second one to ``cv2``."""
    assert "mediapipe" in {canonicalize_name(Requirement(r).name) for r in _pyproject()["optional-dependencies"]["mediapipe"]}
    assert len(_closure({"mediapipe"}) & OPENCV_DISTRIBUTIONS) == 1
    assert len(_closure(set()) & OPENCV_DISTRIBUTIONS) == 1


def test_test_data_is_in_the_repository_with_its_attribution(shared_data: Path) -> None:
    assert shared_data == ROOT / "tests" / "data"
    photo = shared_data / "reference_person.png"
    notes = (shared_data / "README.md").read_text()
    assert "Jessie459/PoseGen" in notes and "examples/image1.png" in notes and "Apache License 2.0" in notes
    assert hashlib.sha256(photo.read_bytes()).hexdigest() in notes
