"""The layers hold: the assignment's five root files and parts/ at the bottom, beyond/ (the ideas)
on them, tools/ (the commands) on top. Every import is read from the source, those inside
functions included (an upward import inside a function is a circle waiting to happen); only
`if TYPE_CHECKING:` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("parts", "beyond", "engine", "tools")

# Imports that close a circle today, each with the reason it stays; the test below fails if a new
# one appears, and if one of these is gone (then delete it here).
KNOWN_CYCLES = {
    ("generate", "tools.generate_cli"): "generate.py's `python generate.py` entry runs the "
                                        "command in tools/ (inside `if __name__ == '__main__'`)",
    ("beyond.int8", "generate"): "int8.teacher_forced_logits pads its prompts with "
                                 "generate.left_pad, and verify.py calls it from beyond.int8",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in [*ROOT.glob("*.py"),
                                       *(p for d in PACKAGES for p in (ROOT / d).glob("*.py"))]}


def ours(name: str) -> str:
    """The repository's module a dotted name lives in ('' if none): parts.checks.is_int is
    parts.checks."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imported(path: Path) -> set[str]:
    """The repository's modules that `path` imports anywhere. A module imported from a package
    counts as itself (`from tools import bench` is tools.bench); a name from a package's
    __init__ as the package (`from parts import ROOT` is parts)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(block.test)
                 for statement in block.body for node in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {ours(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {ours(f"{node.module}.{alias.name}") for alias in node.names}
    return found - {"", module_name(path)}


GRAPH = {name: imported(path) for name, path in MODULES.items()}


@pytest.mark.parametrize("package, may_import", [
    ("parts", ("parts",)),
    ("beyond", ("parts", "beyond", "")),  # "": the root files
])
def test_a_lower_layer_imports_nothing_above_it(package, may_import):
    for name, targets in GRAPH.items():
        if name.partition(".")[0] == package:
            layer = {t.partition(".")[0] if "." in t or t in PACKAGES else "" for t in targets}
            assert layer <= set(may_import), f"{name} imports {sorted(targets)}"


def test_only_verify_and_the_generate_entry_import_tools_from_below():
    below = {name: sorted(t for t in targets if t.startswith("tools"))
             for name, targets in GRAPH.items() if not name.startswith("tools")}
    assert {name: t for name, t in below.items() if t} == {
        "generate": ["tools.generate_cli"], "verify": ["tools.references"]}
    assert not [name for name, targets in GRAPH.items() if "verify" in targets]


def test_no_import_closes_a_circle_but_the_known_ones():
    graph = {name: set(targets) for name, targets in GRAPH.items()}
    for source, target in KNOWN_CYCLES:
        assert target in graph[source], f"{source} -> {target} is gone: delete it from KNOWN_CYCLES"
        graph[source].discard(target)
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            for target in sorted(graph[name]):
                visit(target, [*path, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_graph_is_read():
    # the tests above must not pass by reading nothing
    assert {"beyond.window", "cache", "engine.fast"} <= GRAPH["block"]
    assert "tools.measure" in GRAPH["tools.flash"] and "tools.bench_hf" in GRAPH["tools.bench"]
    assert "generate" in GRAPH["beyond.int8"]  # inside a function
    assert "block" not in GRAPH["beyond.latent"]  # under TYPE_CHECKING only
