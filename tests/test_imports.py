"""The package's import graph: no cycles, no private names across packages.

Read from the source with `ast` (nothing is imported), so a cycle that a
lazy import inside a function would hide is still found: every import
statement counts, wherever it stands. Importing `a.b.c` also runs `a` and
`a.b` (their `__init__`), so those are edges too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ttt_jax", "pallas_kernels")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: pathlib.Path, modules: dict[str, pathlib.Path]):
  """(imported module, imported names) for every project import in `path`."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, ()
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = tuple(a.name for a in node.names)
      submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in modules]
      yield node.module, tuple(n for n in names if f"{node.module}.{n}" not in modules)
      for sub in submodules:
        yield sub, ()


def graph() -> dict[str, set[str]]:
  modules = project_modules()
  edges = {m: set() for m in modules}
  for m, path in modules.items():
    for target, _ in imports_of(path, modules):
      parts = target.split(".")
      for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b, a.b.c
        prefix = ".".join(parts[:i])
        if prefix in modules and prefix != m and not m.startswith(prefix + "."):
          edges[m].add(prefix)
  return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for n in sorted(edges[m]):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state and (cycle := visit(n)):
        return cycle
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(edges):
    if m not in state and (cycle := visit(m)):
      return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  cycle = find_cycle(graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_across_packages():
  modules = project_modules()
  bad = []
  for m, path in modules.items():
    for target, names in imports_of(path, modules):
      if target.split(".")[0] not in PACKAGES:
        continue
      same_package = target.rsplit(".", 1)[0] == m.rsplit(".", 1)[0] or target.startswith(m + ".")
      bad += [f"{m} imports {target}.{n}" for n in names if n.startswith("_") and not same_package]
  assert not bad, "private names imported across modules' packages:\n" + "\n".join(bad)


@pytest.mark.parametrize("user", ["ttt_jax.layers.ttt", "ttt_jax.layers.attention",
                                  "ttt_jax.models.dit", "ttt_jax.data.pipeline"])
def test_layout_is_below_its_users(user):
  """VideoLayout is a sequence concept: models, layers and data import it from ttt_jax.layout."""
  edges = graph()
  assert "ttt_jax.layout" in edges[user]
  assert not any(m.startswith("ttt_jax.data") for m in edges[user]) or user.startswith("ttt_jax.data")
  assert edges["ttt_jax.layout"] == set()
