"""Import layering, read from the source (AST, imports inside functions included): no back-edges, no cycles.

Rules: maxlm.models imports none of maxlm.serve, maxlm.train, maxlm.convert; data_pipelines and kernels_pallas
import nothing from maxlm; only tests import kernels_pallas.reference (the kernels' test reference); and no two
modules reach each other through imports (a package's __init__ is a module of its own).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("maxlm", "data_pipelines", "kernels_pallas", "configs")
REFERENCE = "kernels_pallas.reference"

# module -> {imported module: "path:line" of the first such import}
Graph = dict[str, dict[str, str]]


def _module_name(path: Path, root: Path) -> str:
  """Dotted module name of a .py file under root; a package's __init__.py is the package itself."""
  parts = list(path.relative_to(root).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
  """The longest prefix of dotted `name` that is a scanned module (None for modules outside the scan)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in modules:
      return ".".join(parts[:n])
  return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
  """(dotted name, line) of everything `tree` imports, anywhere in it; `from a import b` yields a.b."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[:len(package) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
  return found


def scan(root: Path, packages: tuple[str, ...] = PACKAGES) -> Graph:
  """The import graph among the modules of `packages` under `root`, by reading every .py file."""
  files = {}
  for package in packages:
    for path in sorted((root / package).rglob("*.py")):
      if "__pycache__" not in path.parts:
        files[_module_name(path, root)] = path
  graph: Graph = {name: {} for name in files}
  for name, path in files.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    for imported, line in _imports(tree, name, path.name == "__init__.py"):
      target = _resolve(imported, set(files))
      if target is not None and target != name:
        graph[name].setdefault(target, f"{path.relative_to(root)}:{line}")
  return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
  """Tarjan's strongly connected components of `graph` with more than one module, each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, {}):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return components


def cycle_path(graph: Graph, component: list[str]) -> list[str]:
  """A shortest cycle through the component's first module, inside the component: [a, b, ..., a]."""
  start, members = component[0], set(component)
  parent: dict[str, str] = {}
  queue = deque([start])
  while queue:
    v = queue.popleft()
    for w in sorted(graph[v]):
      if w == start:
        path = [v]
        while path[-1] != start:
          path.append(parent[path[-1]])
        return path[::-1] + [start]
      if w in members and w not in parent:
        parent[w] = v
        queue.append(w)
  raise AssertionError(f"{component} is not strongly connected")


def describe_cycle(graph: Graph, path: list[str]) -> str:
  """'a -> b (a.py:3) -> a (b.py:9)': each step with the import that makes it."""
  steps = [path[0]] + [f"{b} ({graph[a][b]})" for a, b in zip(path, path[1:])]
  return " -> ".join(steps)


def _violations(graph: Graph, importer, imported) -> list[str]:
  """'path:line: a imports b' for every edge whose ends satisfy the two predicates."""
  return [f"{where}: {a} imports {b}" for a, targets in sorted(graph.items()) if importer(a)
          for b, where in sorted(targets.items()) if imported(b)]


def _in(*packages: str):
  return lambda name: any(name == p or name.startswith(p + ".") for p in packages)


@pytest.fixture(scope="module")
def graph() -> Graph:
  return scan(ROOT)


def test_the_scan_sees_the_tree(graph):
  # Not vacuous: the packages were found and ordinary imports resolve to modules.
  assert len(graph) > 40 and all(_in(*PACKAGES)(name) for name in graph)
  assert "kernels_pallas.masking" in graph["maxlm.models.attention"]
  assert "maxlm.quant.weights" in graph["maxlm.models.layers"]


def test_models_do_not_import_serving_training_or_conversion(graph):
  bad = _violations(graph, _in("maxlm.models"), _in("maxlm.serve", "maxlm.train", "maxlm.convert"))
  assert not bad, "the model layer imports a layer above it:\n" + "\n".join(bad)


def test_data_pipelines_and_kernels_do_not_import_maxlm(graph):
  bad = _violations(graph, _in("data_pipelines", "kernels_pallas"), _in("maxlm"))
  assert not bad, "a lower layer imports maxlm:\n" + "\n".join(bad)


def test_production_code_does_not_import_the_kernel_reference(graph):
  bad = _violations(graph, lambda name: name != REFERENCE, _in(REFERENCE))
  assert not bad, f"{REFERENCE} is a test reference; production code imports it:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
  cycles = [describe_cycle(graph, cycle_path(graph, c)) for c in strongly_connected(graph)]
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_catches_a_cycle_made_by_a_function_level_import(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from . import low\n")
  (pkg / "sub" / "low.py").write_text("import os\n\n\ndef f():\n  from pkg import high\n  return high\n")
  (pkg / "high.py").write_text("from pkg.sub.low import f\n")
  (pkg / "leaf.py").write_text("from .sub import low\n")
  graph = scan(tmp_path, ("pkg",))
  assert graph == {"pkg": {}, "pkg.sub": {"pkg.sub.low": "pkg/sub/__init__.py:1"},
                   "pkg.sub.low": {"pkg.high": "pkg/sub/low.py:5"}, "pkg.high": {"pkg.sub.low": "pkg/high.py:1"},
                   "pkg.leaf": {"pkg.sub.low": "pkg/leaf.py:1"}}
  assert strongly_connected(graph) == [["pkg.high", "pkg.sub.low"]]
  assert describe_cycle(graph, cycle_path(graph, ["pkg.high", "pkg.sub.low"])) == (
    "pkg.high -> pkg.sub.low (pkg/high.py:1) -> pkg.high (pkg/sub/low.py:5)")
  # Without the function-level import there is no cycle.
  (pkg / "sub" / "low.py").write_text("import os\n")
  assert strongly_connected(scan(tmp_path, ("pkg",))) == []


def test_strongly_connected_on_a_synthetic_graph():
  # Two cycles (one of three modules) joined by a one-way edge, plus an acyclic tail.
  graph = {"a": {"b": ""}, "b": {"c": ""}, "c": {"a": "", "d": ""}, "d": {"e": ""}, "e": {"d": ""}, "f": {"a": ""}}
  assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d", "e"]]
  assert cycle_path(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
  assert strongly_connected({"a": {"b": ""}, "b": {"c": ""}, "c": {}}) == []
