"""docs/ARCHITECTURE.md's layer list, enforced: every import (lazy ones inside functions too) points up
the list or stays in its layer, and the package has no import circle."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "padnet_ds"


def layers() -> List[List[str]]:
    """The ```layers block of docs/ARCHITECTURE.md: one layer per line, entries are files or folders/."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md has no ```layers block"
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(path: Path, order: List[List[str]]) -> int:
    rel = path.relative_to(PACKAGE).as_posix()
    hits = [i for i, entries in enumerate(order) for e in entries
            if rel == e or (e.endswith("/") and rel.startswith(e))]
    assert len(hits) == 1, f"padnet_ds/{rel} is named by {len(hits)} entries of the layers block (needs exactly 1)"
    return hits[0]


def imports(path: Path, known: Set[str], source: Optional[str] = None) -> Set[str]:
    """padnet_ds modules ``path`` (or ``source`` as if it were that file) imports anywhere, relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import padnet_ds.engine.trainer as t` etc.
                target = target.rpartition(".")[0]
            if target.startswith("padnet_ds") and target != name:
                found.add(target)
    return found


def violations(mods: Dict[str, Path], graph: Dict[str, Set[str]]) -> List[str]:
    order, problems = layers(), []
    for name, targets in graph.items():
        mine = layer_of(mods[name], order)
        for target in sorted(targets):
            theirs = layer_of(mods[target], order)
            if theirs > mine:
                problems.append(f"{name} (layer {mine}: {' '.join(order[mine])}) imports {target} "
                                f"(layer {theirs}: {' '.join(order[theirs])})")
    return problems


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return found


def package_graph() -> Dict[str, Set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def test_every_import_follows_the_documented_layers():
    problems = violations(modules(), package_graph())
    assert not problems, "imports against docs/ARCHITECTURE.md's layers:\n  " + "\n  ".join(problems)


def test_no_import_circles():
    found = cycles(package_graph())
    assert not found, "import circles:\n  " + "\n  ".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("source", ["from ..engine.trainer import train\n",
                                    "def f():\n    from ..engine import trainer\n"], ids=["top-level", "lazy"])
def test_an_upward_import_is_reported(source):
    mods = modules()
    compose = "padnet_ds.pad.compose"
    graph = {compose: imports(mods[compose], set(mods), source)}
    assert graph[compose] == {"padnet_ds.engine.trainer"}
    assert violations(mods, graph) == [f"{compose} (layer 1: pad/) imports padnet_ds.engine.trainer (layer 7: engine/)"]


def test_a_circle_is_reported():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
