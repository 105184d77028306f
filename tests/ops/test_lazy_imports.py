"""``import blipfast.ops`` (and ``import blipfast``) imports torch, and Triton where it is installed, only: the models
and the patch, which import transformers (seconds), load on first use of one of their names."""
from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import blipfast

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (it prints one JSON line) with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_ops_leaves_transformers_and_the_models_out():
    got = _run("import sys, json, blipfast.ops, blipfast\n"
               "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
               "('transformers', 'blipfast'))))")
    assert not [m for m in got if m.startswith("transformers")], got
    assert not [m for m in got if m.startswith(("blipfast.models", "blipfast.patch", "blipfast.convert"))], got
    assert "blipfast.ops" in got


def test_public_names_load_on_first_use():
    got = _run("import sys, json, blipfast\n"
               "before = 'transformers' in sys.modules\n"
               "q = blipfast.QFormer\n"
               "ns = {}\n"
               "exec('from blipfast import *', ns)\n"
               "missing = [n for n in blipfast.__all__ if n not in ns]\n"
               "print(json.dumps({'before': before, 'qformer': q.__module__, 'missing': missing, "
               "'dir': dir(blipfast), 'convert': blipfast.convert.__name__}))")
    assert got["before"] is False
    assert got["qformer"] == "blipfast.models.qformer"
    assert got["missing"] == []
    assert set(blipfast.__all__) <= set(got["dir"])
    assert got["convert"] == "blipfast.convert"  # subpackages too, as when the models were imported eagerly


def test_unknown_name_is_an_attribute_error():
    for name in ("not_a_name", "_C_private"):
        try:
            getattr(blipfast, name)
        except AttributeError as exc:
            assert name in str(exc)
        else:
            raise AssertionError(f"blipfast.{name} did not raise")


def test_ops_import_no_transformers_and_no_models():
    """Statically: no module under blipfast/ops imports transformers or anything above the ops."""
    bad = []
    for path in sorted((ROOT / "blipfast" / "ops").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for n in names:
                if n.startswith("transformers") or (n.startswith("..") and not n.startswith(("..kernels", ".._ext"))):
                    bad.append(f"{path.name}: {n}")
    assert not bad, bad
