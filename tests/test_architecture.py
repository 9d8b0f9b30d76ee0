"""The package's shape: an import graph without loops that only points down the layers, short parameter lists, and
library modules that name settings, never command-line flags (issue 11). Everything here reads the source with ``ast``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import posegen_cli

PACKAGE = Path(posegen_cli.__file__).parent

LAYERS: dict[str, int] = {
    # base utilities: the version, the choice tuples and the error types, then what builds on them
    "__init__": 0, "choices": 0, "errors": 0,
    "report": 1, "device": 1, "fsutil": 1, "cache": 1, "hub": 1,
    # frames in and out, and the release's 9:16 framing
    "video": 2,
    # the stages below the pipeline; none of them imports another
    "pose": 3, "prompting": 3, "models": 3,
    # one segment on diffusers
    "pipelines": 4,
    # the whole job
    "longvideo": 5,
    # tiny random models for tests and the benchmarks
    "testing": 6,
    # the command line
    "cli": 7,
}  # fmt: skip
"""A module may import its own component and components of lower layers only (same-layer components are siblings)."""

MAX_PARAMETERS = 10


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def component(name: str) -> str:
    """The layer key of a module: its first folder, or its own name at the top (``posegen_cli`` itself is ``__init__``)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, known: set[str]) -> set[str]:
    """Every posegen module ``path`` imports, at module level or inside functions, typing-only blocks included."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == "posegen_cli")
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, known) for name, path in found.items()}


def test_every_component_has_a_layer() -> None:
    assert {component(name) for name in modules()} <= set(LAYERS)


def test_imports_only_point_down_the_layers() -> None:
    wrong = []
    for name, targets in import_graph().items():
        for target in targets:
            source, dest = component(name), component(target)
            if source != dest and LAYERS[dest] >= LAYERS[source]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports from a lower layer to a higher (or sibling) one:\n" + "\n".join(sorted(wrong))


def test_named_rules_hold() -> None:
    """The rules the project states by name: the pipeline never reads the pose stage, prompting never the pipeline."""
    graph = import_graph()
    for source, forbidden in (("pipelines", "pose"), ("prompting", "pipelines"), ("models", "pose"), ("models", "pipelines")):
        bad = [f"{n} -> {t}" for n, ts in graph.items() if component(n) == source for t in ts if component(t) == forbidden]
        assert not bad, bad


def test_the_import_graph_has_no_loop() -> None:
    graph = {name: {t for t in targets if t in graph_keys} for name, targets in import_graph().items() for graph_keys in [set(modules())]}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if target == name or _is_parent(target, name):
                continue  # a package's __init__ re-exporting its own modules is not a loop
            if state.get(target) == 1:
                loop = stack[stack.index(target) :] + [target]
                pytest.fail("import loop: " + " -> ".join(loop))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _is_parent(package: str, module: str) -> bool:
    """Whether ``package`` is a package containing ``module`` (importing it is the parent's initialisation)."""
    return module.startswith(package + ".") and (PACKAGE.parent / package.replace(".", "/") / "__init__.py").is_file()


def test_a_package_init_only_loads_its_own_modules() -> None:
    """The one place a module points at its package's ``__init__`` (and back) is that package re-exporting it."""
    graph = import_graph()
    for name, targets in graph.items():
        for target in targets:
            if _is_parent(target, name):
                assert not (PACKAGE.parent / name.replace(".", "/")).is_dir(), f"{name} imports its parent {target}"
                assert name not in graph[target] or target == module_name(PACKAGE / "__init__.py"), (
                    f"{name} imports its own package {target}, which imports it back"
                )


def _exempt(node: ast.FunctionDef | ast.AsyncFunctionDef, path: Path) -> bool:
    """Typer commands (one parameter per flag), diffusers' ``__call__`` and ``@register_to_config`` constructors
    (flat keyword conventions of the libraries they plug into)."""
    decorators = [ast.unparse(d) for d in node.decorator_list]
    if path.name == "cli.py" and any(d.startswith("app.command") for d in decorators):
        return True
    if node.name == "__init__" and "register_to_config" in decorators:
        return True
    return node.name == "__call__" and path.name == "pipeline_posegen.py"


def test_no_public_function_takes_more_than_ten_parameters() -> None:
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_") and node.name != "__init__":
                continue
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            count = len([n for n in names if n not in ("self", "cls")]) + (args.vararg is not None) + (args.kwarg is not None)
            if count > MAX_PARAMETERS and not _exempt(node, path):
                long.append(f"{name}.{node.name}: {count}")
    assert not long, "public functions with more than 10 parameters (group them in a settings object):\n" + "\n".join(long)


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def test_library_modules_name_no_command_line_flags() -> None:
    """Messages, docstrings and comments outside cli.py name settings (``errors.option``), never ``--flags``."""
    named = []
    for name, path in modules().items():
        if path.name == "cli.py" or component(name) == "testing":
            continue  # the command line itself, and the tiny-model command's own help
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FLAG.search(line):
                named.append(f"{name}:{number}: {line.strip()}")
    assert not named, "flags named outside cli.py:\n" + "\n".join(named)


def test_the_dit_declares_only_what_it_does() -> None:
    """The forward never checkpoints, so diffusers refuses gradient checkpointing instead of silently ignoring it."""
    from posegen_cli.models import PoseGenTransformer3DModel, tiny_transformer_config

    model = PoseGenTransformer3DModel(**tiny_transformer_config())
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        model.enable_gradient_checkpointing()


def test_cli_choices_are_the_librarys() -> None:
    from posegen_cli import choices, cli

    for enum, values in (
        (cli.Backend, choices.BACKENDS), (cli.HandNormals, choices.HAND_NORMAL_SOURCES), (cli.AlignMode, choices.ALIGN_MODES),
        (cli.Offload, choices.OFFLOAD_MODES), (cli.KeypointFormat, choices.OUTPUT_FORMATS),
        (cli.ShotType, ("auto", *choices.SHOT_TYPES)),
    ):  # fmt: skip
        assert tuple(member.value for member in enum) == values


def test_errors_carry_the_setting_and_the_cli_spells_it_as_its_flag() -> None:
    from posegen_cli.cli import ANIMATE_FLAGS, _flags
    from posegen_cli.errors import OptionError, option
    from posegen_cli.pose.backends import resolve_backend

    with pytest.raises(OptionError) as caught:
        resolve_backend("openpose")
    error = caught.value
    assert (error.option, error.value, error.choices) == ("backend", "openpose", ("auto", "sapiens", "mediapipe"))
    assert str(error) == "--backend 'openpose' is not known (use auto, sapiens, mediapipe)"
    assert error.phrase(_flags(ANIMATE_FLAGS)) == "--pose-backend 'openpose' is not known (use auto, sapiens, mediapipe)"
    assert OptionError("work_dir", "x", problem=f"is full (pass {option('work_dir')} elsewhere)").phrase(lambda n: f"<{n}>") == (
        "<work_dir> is full (pass <work_dir> elsewhere)"
    )
