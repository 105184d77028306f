"""The layout of tests/: one folder per part of the package (its subpackages and modules, kernels/ and csrc/ under
kernels, the command-line modules under cli), each a package (``tests.<folder>.<module>``, so basenames may repeat);
what tests share lives in tests/helpers/: no module of tests/ imports another test module, conftest.py or a helper
kept elsewhere."""
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
    """Absolute names of what ``source`` (a module of ``package``) imports: ``import a.b`` gives a.b, ``from a import
    b`` gives a.b, relative imports resolved."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(x for x in (base, node.module) if x)
            names += [f"{mod}.{a.name}" for a in node.names]
    return names


def _outside_helpers(name: str) -> bool:
    """A name from tests/ that is not tests/helpers/'s: another test module, conftest.py, a helper kept elsewhere."""
    return name.split(".")[0] == "tests" and not name.startswith("tests.helpers.")


def test_every_test_module_sits_in_a_folder_that_mirrors_the_package():
    parts = {p.stem for p in (ROOT / "blipfast").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    folders = {p.parent for p in _modules()}
    assert not [p.name for p in TESTS.glob("test_*.py")], "test modules belong in a folder of tests/"
    assert not [str(d) for d in folders if not (d / "__init__.py").is_file()], "every folder of tests/ is a package"
    stray = [d.name for d in folders if d != TESTS and d.parent == TESTS and d.name not in parts | OTHER]
    assert not stray, f"folders of tests/ that mirror no part of blipfast: {stray}"


def test_tests_import_from_tests_only_its_helpers():
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in _modules()
           for name in _imported(p.read_text(), _package(p)) if _outside_helpers(name)]
    assert not bad, f"what tests share belongs in tests/helpers/ (fixtures: tests/conftest.py): {bad}"


def test_the_import_scan_sees_each_form():
    for line in ("from tests.ops.test_compile import x", "from tests import test_x", "from .conftest import FLOOR",
                 "from .test_attention import DEV", "import tests.kernels.test_itc as t", "from ..conftest import F",
                 "def f():\n    from tests.models.test_blip2 import make_batch\n", "from .wds_helpers import x",
                 "from tests import conftest"):
        assert any(_outside_helpers(n) for n in _imported(line + "\n", "tests.kernels")), line
    ok = "from tests.helpers.runtime import ROOT\nfrom ..helpers import train\nfrom tests.helpers import itc\nimport torch\n"
    assert not any(_outside_helpers(n) for n in _imported(ok, "tests.kernels"))
