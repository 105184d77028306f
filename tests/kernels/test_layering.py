"""The house flows one way (docs/design.md#import-rules): blipfast.kernels (the kernels/ directory) imports nothing
from blipfast, and importing the package or its shared rules does not need Triton."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

from tests.helpers.runtime import ROOT

KERNELS = ROOT / "kernels"


def _blipfast_imports(path: pathlib.Path) -> list[str]:
    """Imports of blipfast in a kernels/ source: absolute ``blipfast...`` and relative ones that climb out of
    the package (kernels/ is installed as blipfast.kernels, so ``from ..ops`` is blipfast.ops)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            bad += [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "blipfast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= 2 or (node.level == 0 and (node.module or "").split(".")[0] == "blipfast"):
                bad.append(f"from {'.' * node.level}{node.module or ''} import ...")
    return [f"{path.name}:{b}" for b in bad]


def test_kernels_import_nothing_from_blipfast():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 5, files
    bad = [b for f in files for b in _blipfast_imports(f)]
    assert not bad, f"kernels/ must not import blipfast: {bad}"


def test_scanner_catches_each_form(tmp_path):
    src = tmp_path / "k.py"
    for line in ("import blipfast", "import blipfast.ops._philox as p", "from blipfast.ops import x",
                 "from .. import ops", "from ..ops._philox import dropout_threshold",
                 "def f():\n    from blipfast import ops\n"):
        src.write_text(line + "\n")
        assert _blipfast_imports(src), line
    src.write_text("from ._constants import argmax_dtype\nimport triton\nfrom . import _attention_common\n")
    assert not _blipfast_imports(src)


def test_shared_rules_live_in_one_place_without_triton():
    """dropout_threshold and argmax_dtype are defined once (kernels/_constants.py) and the ops re-use them;
    neither blipfast.kernels nor its _constants module imports Triton."""
    code = ("import sys, blipfast.kernels, blipfast.kernels._constants as c\n"
            "assert 'triton' not in sys.modules, 'importing blipfast.kernels pulled in triton'\n"
            "import importlib\n"
            "philox, itc = (importlib.import_module(f'blipfast.ops.{m}') for m in ('_philox', 'itc_loss'))\n"
            "assert philox.dropout_threshold is c.dropout_threshold\n"
            "assert itc.argmax_dtype is c.argmax_dtype\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    defs = [f.name for f in KERNELS.parent.joinpath("blipfast").rglob("*.py")
            if "def argmax_dtype" in f.read_text() or "def dropout_threshold" in f.read_text()]
    defs += [f.name for f in KERNELS.glob("*.py")
             if "def argmax_dtype" in f.read_text() or "def dropout_threshold" in f.read_text()]
    assert defs == ["_constants.py"], defs
