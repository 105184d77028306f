"""The layout of tests/: one folder per part of the package (its subpackages and modules, kernels/ and csrc/ under
kernels, the command-line modules under cli), each a package (``tests.<folder>.<module>``, so basenames may repeat);
what tests share lives in tests/helpers/ and no test module imports another test module or conftest.py."""
from __future__ import annotations

import ast

from tests.helpers.runtime import ROOT

TESTS = ROOT / "tests"
# folders that are not a part of blipfast: the build (packaging), the documentation, the GPU session scripts, helpers
OTHER = {"packaging", "docs", "gpu", "helpers"}


def _modules():
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _package(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def _imported(source: str, package: str) -> list[str]:
    """Absolute names of the modules ``source`` (a module of ``package``) imports, relative imports resolved."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(x for x in (base, node.module) if x)
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return names


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "tests" and (any(p.startswith("test_") for p in parts[1:]) or parts[-1] == "conftest")


def test_every_test_module_sits_in_a_folder_that_mirrors_the_package():
    parts = {p.stem for p in (ROOT / "blipfast").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    folders = {p.parent for p in _modules()}
    assert not [p.name for p in TESTS.glob("test_*.py")], "test modules belong in a folder of tests/"
    assert not [str(d) for d in folders if not (d / "__init__.py").is_file()], "every folder of tests/ is a package"
    stray = [d.name for d in folders if d != TESTS and d.parent == TESTS and d.name not in parts | OTHER]
    assert not stray, f"folders of tests/ that mirror no part of blipfast: {stray}"


def test_no_test_module_imports_another_test_module():
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in _modules()
           for name in _imported(p.read_text(), _package(p)) if _is_test_module(name)]
    assert not bad, f"shared test code belongs in tests/helpers/: {bad}"


def test_the_import_scan_sees_each_form():
    for line in ("from tests.ops.test_compile import x", "from tests import test_x", "from .conftest import FLOOR",
                 "from .test_attention import DEV", "import tests.kernels.test_itc as t", "from ..conftest import F",
                 "def f():\n    from tests.models.test_blip2 import make_batch\n"):
        assert any(_is_test_module(n) for n in _imported(line + "\n", "tests.kernels")), line
    ok = "from tests.helpers.runtime import ROOT\nfrom . import helpers\nfrom ..helpers import train\nimport torch\n"
    assert not any(_is_test_module(n) for n in _imported(ok, "tests.kernels"))
