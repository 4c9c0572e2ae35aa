"""Reading compiled HLO text: collectives, their shapes, and where while loops put them."""

from __future__ import annotations

import re

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")
_OP = re.compile(r"=\s*(\([^=]*?\)|[\w\[\]{},:\d]+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def computations(hlo: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines}."""
  comps, name = {}, None
  for line in hlo.splitlines():
    if name is None and (m := _HEADER.match(line)):
      name = m.group(1)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def _callees(lines: list[str]) -> set[str]:
  out = set()
  for line in lines:
    out.update(_CALLS.findall(line))
    for group in _BRANCHES.findall(line):
      out.update(n.strip().lstrip("%") for n in group.split(","))
  return out


def reachable(comps: dict[str, list[str]], root: str) -> set[str]:
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    todo.extend(_callees(comps[name]))
  return seen


def collectives(lines: list[str]) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(kind, result shapes) of every collective among `lines`."""
  out = []
  for line in lines:
    if m := _OP.search(line):
      shapes = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(m.group(1))]
      out.append((m.group(2), shapes))
  return out


def collectives_in_while_bodies(hlo: str, min_depth: int = 1) -> list[tuple[str, str]]:
  """(while body, collective kind) for collectives inside loops nested >= min_depth deep.

  min_depth=1: any while loop; 2: loops inside a loop body (e.g. the TTT scan
  inside the scan over blocks, whose body legitimately all-gathers FSDP weights).
  """
  comps = computations(hlo)
  found = []

  def visit(body: str, depth: int) -> None:
    inside = reachable(comps, body)
    if depth >= min_depth:
      for comp in inside:
        found.extend((body, kind) for kind, _ in collectives(comps[comp]))
    for comp in inside:
      for line in comps[comp]:
        if (m := _WHILE_BODY.search(line)) and m.group(1) != body:
          visit(m.group(1), depth + 1)

  top = [m.group(1) for name, lines in comps.items() for line in lines
         if (m := _WHILE_BODY.search(line))]
  nested = {m.group(1) for name in top for comp in reachable(comps, name)
            for line in comps[comp] if (m := _WHILE_BODY.search(line)) and m.group(1) != name}
  for body in top:
    if body not in nested:
      visit(body, 1)
  return sorted(set(found))
