"""The house flows one way: cli -> train / evaluation / retrieval / capfilt / generate -> models -> ops ->
blipfast.kernels / blipfast._C. The import graph of blipfast (every import statement, also those inside functions)
has no cycle, models import nothing from the application layer, ops import no model, and the Triton kernels import
nothing from blipfast (docs/design.md)."""
from __future__ import annotations

import ast
import sys

from tests.helpers.runtime import ROOT

PKG = ROOT / "blipfast"
KERNELS = ROOT / "kernels"
# what models must never import: the application layer above them
ABOVE_MODELS = ("train", "data", "patch", "cli", "bench", "evaluation", "capfilt", "retrieval", "retrieval_cli",
                "generate", "options", "sources", "testing")


def _modules() -> dict:
    """Module name -> source path, blipfast.kernels mapped onto the top-level kernels/ folder."""
    mods = {}
    for base, prefix in ((PKG, "blipfast"), (KERNELS, "blipfast.kernels")):
        for p in base.rglob("*.py"):
            parts = p.relative_to(base).with_suffix("").parts
            name = ".".join((prefix,) + parts)
            mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


def _edges(mods: dict) -> dict:
    """Module -> the blipfast modules it imports. ``from pkg import name`` counts as an import of pkg.name when that is
    a module (Python needs pkg initialised, which a submodule's own import of it does not re-enter)."""
    edges = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                mod = node.module if not node.level else ".".join(x for x in (base, node.module) if x)
                subs = {f"{mod}.{a.name}" for a in node.names} & set(mods)
                if subs:
                    out |= subs
                elif mod in mods:
                    out.add(mod)
        edges[name] = out - {name}
    return edges


def _area(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_upward_import():
    mods = _modules()
    bad = [(a, b) for a, bs in _edges(mods).items() for b in bs
           if (_area(a) == "models" and _area(b) in ABOVE_MODELS)
           or (_area(a) == "ops" and _area(b) == "models")
           or (_area(a) == "kernels" and _area(b) != "kernels")]
    assert not bad, f"imports against the flow (models -> ops -> kernels): {sorted(bad)}"


def test_no_import_cycle():
    edges = _edges(_modules())
    # package __init__ modules re-export their submodules: an edge into a package's own __init__ from inside the
    # package is how Python initialises it, not a cycle of the code
    color, cycles = {}, []

    def visit(u, stack):
        color[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if u.startswith(v + "."):
                continue
            if color.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in color:
                visit(v, stack)
        stack.pop()
        color[u] = 2

    for m in sorted(edges):
        if m not in color:
            visit(m, [])
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_scan_sees_a_cycle_and_an_upward_import(monkeypatch, tmp_path):
    """The checks above can fail: a fake module graph with a cycle and a model importing train."""
    g = sys.modules[__name__]
    fake = {"blipfast.models.a": "from blipfast.train import loop\n", "blipfast.train.loop": "from ..models import a\n"}
    paths = {}
    for name, src in fake.items():
        p = tmp_path / (name.replace(".", "_") + ".py")
        p.write_text(src)
        paths[name] = p
    paths["blipfast.train"] = paths["blipfast.train.loop"]  # a package to import from
    monkeypatch.setattr(g, "_modules", lambda: paths)
    edges = g._edges(paths)
    assert "blipfast.train.loop" in edges["blipfast.models.a"] and "blipfast.models.a" in edges["blipfast.train.loop"]
    for check in (g.test_no_upward_import, g.test_no_import_cycle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a bad graph")
