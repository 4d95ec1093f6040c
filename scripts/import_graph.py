"""Print the import graph of llmq/ (and kernels/, installed as llmq.kernels), layer by layer.

Reads the source with ast (imports at module level and inside functions alike),
so it needs neither torch nor triton. A module's layer is 0 when it imports
nothing else of llmq, else one more than the highest layer it imports; modules
on an import cycle are reported as such ("back up": a low module importing a
higher one, often lazily inside a function).

    python scripts/import_graph.py [ROOT]      # ROOT: a checkout (default: this one)
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for base, package in ((root / "llmq", "llmq"), (root / "kernels", "llmq.kernels")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            if base.name == "llmq" and rel.parts[0] == "kernels":
                continue  # the symlink to kernels/, counted once
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layers(graph: dict[str, set[str]]) -> tuple[dict[str, int], set[str]]:
    level: dict[str, int] = {}
    on_cycle: set[str] = set()

    def visit(m: str, stack: list[str]) -> int:
        if m in level:
            return level[m]
        if m in stack:
            on_cycle.update(stack[stack.index(m):])
            return 0
        deps = [visit(d, stack + [m]) for d in graph[m]]
        level[m] = 1 + max(deps) if deps else 0
        return level[m]

    for m in graph:
        visit(m, [])
    return level, on_cycle


def main(root: Path) -> None:
    found = modules(root)
    graph = {m: imports(m, p, set(found)) for m, p in found.items()}
    level, on_cycle = layers(graph)
    for lvl in range(max(level.values()) + 1):
        print(f"layer {lvl}:")
        for m in sorted(k for k, v in level.items() if v == lvl):
            deps = ", ".join(sorted(d.removeprefix("llmq.") for d in graph[m]))
            print(f"  {m.removeprefix('llmq.'):28s} <- {deps}")
    face = sorted(m.removeprefix("llmq.") for m, deps in graph.items() if "llmq" in deps)
    print(f"\nimport the package face (llmq/__init__.py): {', '.join(face) or 'none'}")
    print(f"{len(found)} modules, {sum(map(len, graph.values()))} imports; "
          f"on import cycles: {', '.join(sorted(x.removeprefix('llmq.') for x in on_cycle)) or 'none'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1],
                        help="a checkout of llmq (default: this one)")
    root = parser.parse_args().root
    if not (root / "llmq").is_dir():
        parser.error(f"{root} holds no llmq/ package: give a checkout of llmq")
    main(root)
