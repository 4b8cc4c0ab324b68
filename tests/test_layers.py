"""Imports run one way. The layers, from the bottom:

    parts < cache < attention < block < generate < beyond < fast < tools < verify

The assignment at the bottom (parts/ holds only what its files import), the ideas past it on it,
the fast path on the ideas it uses (flash attention), the commands on all of them, verify.py on
top. A module may import its own layer and the layers below it, never one above, and no import
closes a circle, inside a layer either. Every import statement counts: at the top of a file,
inside a function, under `if __name__ == "__main__"`. Only `if TYPE_CHECKING:` blocks are left
out (they never run); the ones that remain are listed in TYPE_ONLY with their reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("parts", "cache", "attention", "block", "generate", "beyond", "fast", "tools", "verify")
TYPE_ONLY = {  # (importer, imported): why a type hint names a module it never imports to run
    ("attention", "cache"): "multi_head_attention's cache is any cache.LayerCache: duck-typed",
    ("beyond.int8", "block"): "int8_cache(model) takes a GPT, and reads only its config",
    ("beyond.latent", "cache"): "latent_attention's cache is any cache.LayerCache",
    ("beyond.cascade", "beyond.paged"): "cascade.attend reads a PagedLayer, which calls it",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")
           if not {"tests", ".venv", "out"} & set(p.relative_to(ROOT).parts)}


def layer(name: str) -> int:
    """The layer of a module: its package, or the root file it is."""
    return LAYERS.index(name.partition(".")[0])


def ours(name: str) -> str:
    """The repository's module a dotted name lives in ('' if none): parts.checks.is_int is
    parts.checks; fast.model.FastGPT is fast.model."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(path: Path) -> tuple[set[str], set[str]]:
    """The repository's modules `path` imports anywhere, and those it names only under
    `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(block.test)
                 for statement in block.body for node in ast.walk(statement)}
    found: tuple[set[str], set[str]] = (set(), set())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found[id(node) in type_only].update(ours(n) for n in names)
    me = module_name(path)
    return found[0] - {"", me}, found[1] - {"", me}


GRAPH, TYPE_HINTS = {}, {}
for _name, _path in MODULES.items():
    GRAPH[_name], TYPE_HINTS[_name] = imports(_path)


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every module from which its own imports lead back to it."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    return sorted(name for name in graph if name in reach(name))


def test_every_module_has_a_layer():
    for name in MODULES:
        assert name.partition(".")[0] in LAYERS, f"{name}: put it in a layer of LAYERS"


def test_no_module_imports_one_from_a_layer_above():
    assert upward(GRAPH) == []


def test_no_import_closes_a_circle():
    assert circles(GRAPH) == []


def test_the_type_only_imports_are_the_listed_ones():
    found = {(a, b) for a, targets in TYPE_HINTS.items() for b in targets}
    assert found == set(TYPE_ONLY)


def test_the_checks_can_fail():
    """An upward import inside a function, and a circle, are found (so the tests above are not
    passing by reading nothing)."""
    tree = ast.parse("def f():\n    from tools import bench\n")
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree))
    assert upward({"block": {"tools.bench"}, "tools.bench": set()}) == [("block", "tools.bench")]
    assert circles({"beyond.a": {"beyond.b"}, "beyond.b": {"beyond.a"}}) == ["beyond.a",
                                                                             "beyond.b"]
    assert {"attention", "cache", "block", "generate", "verify", "fast.model",
            "beyond.window", "tools.bench"} <= set(GRAPH)
    assert "cache" in GRAPH["block"] and "attention" in GRAPH["block"]


CACHE_KINDS = ("Window", "window_cache", "Rolling", "Int8", "int8_cache", "Latent", "Paged",
               "paged")


def identifiers(path: Path) -> set[str]:
    """Every name the code of a file uses (variables, attributes, imports, definitions), not its
    docstrings or comments, which may well explain the kinds."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias.asname or alias.name for alias in node.names}
    return names


@pytest.mark.parametrize("name", ["block", "generate", "fast.model"])
def test_the_model_and_the_decoders_name_no_cache_kind(name):
    """block.py, generate.py and the fast path run any cache through the protocol: none of them
    imports an idea's module (the fast path's flash attention aside) or names a kind of cache."""
    assert not {t for t in GRAPH[name] if t.startswith("beyond.") and t != "beyond.flash"}
    named = {n for n in identifiers(MODULES[name]) if any(kind in n for kind in CACHE_KINDS)}
    assert named == set(), f"{name} names {sorted(named)}"
    assert "WindowCache" in identifiers(MODULES["beyond.window"])  # the check reads names
