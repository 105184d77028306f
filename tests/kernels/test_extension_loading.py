"""blipfast._C that is missing or does not load: reported, never raised at ``import blipfast``; the tests that need it
fail where a CUDA device is visible (unless the build was switched off) and skip on a CPU-only machine; ``blipfast
info`` prints the load error. The CUDA device and the failing import are simulated (monkeypatch), so this runs
everywhere.
"""
from __future__ import annotations

import importlib.abc
import json
import sys
import types

import pytest
import torch

from blipfast import _ext
from tests.helpers.runtime import extension_setup, require_extension

ABI_ERROR = "_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev"


class _Refuse(importlib.abc.MetaPathFinder):
    """Fails the import of blipfast._C as a library built against another torch does."""

    def find_spec(self, name, path=None, target=None):
        if name == _ext.NAME:
            raise ImportError(ABI_ERROR)
        return None


@pytest.fixture
def extension_state(monkeypatch):
    """Sets up a state of blipfast._C (``"abi"``: fails to load, ``"missing"``: not built) and of the machine (a CUDA
    device visible or not); _ext's cached load result is dropped before and after."""
    for var in ("BLIPFAST_BUILD_CUDA", "BLIPFAST_DISABLE_C"):
        monkeypatch.delenv(var, raising=False)

    def set_state(ext: str, cuda: bool):
        monkeypatch.delitem(sys.modules, _ext.NAME, raising=False)
        if ext == "abi":
            monkeypatch.setattr(sys, "meta_path", [_Refuse(), *sys.meta_path])
        else:
            monkeypatch.setitem(sys.modules, _ext.NAME, None)  # import raises ModuleNotFoundError
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        _ext._load.cache_clear()

    yield set_state
    _ext._load.cache_clear()


@pytest.mark.parametrize("ext, words", [("abi", f"does not load: ImportError: {ABI_ERROR}"),
                                        ("missing", "not built (ModuleNotFoundError")])
def test_load_error_is_the_exception_text(extension_state, ext, words):
    extension_state(ext, cuda=False)
    assert _ext.extension() is None and not _ext.cuda_extension_available()
    assert words in _ext.load_error()
    info = _ext.build_info()
    assert info["extension"] is False and words in info["extension_error"]


def _outcome(check=require_extension) -> tuple[str, str]:
    """("fail" | "skip" | "pass", message) of ``check()`` (a skip caught here, so that a check that skips where it
    must fail fails this test instead of skipping it)."""
    try:
        check()
    except pytest.fail.Exception as exc:
        return "fail", str(exc)
    except pytest.skip.Exception as exc:
        return "skip", str(exc)
    return "pass", ""


@pytest.mark.parametrize("ext", ["abi", "missing"])
def test_with_a_cuda_device_a_missing_or_broken_extension_fails_the_test(extension_state, ext):
    extension_state(ext, cuda=True)
    kind, msg = _outcome()
    assert kind == "fail" and "blipfast._C is needed on a machine with a CUDA device" in msg, (kind, msg)
    assert _ext.load_error() in msg and "BLIPFAST_BUILD_CUDA=0" in msg


@pytest.mark.parametrize("ext", ["abi", "missing"])
def test_without_a_cuda_device_it_skips_with_the_reason(extension_state, ext):
    extension_state(ext, cuda=False)
    kind, msg = _outcome()
    assert kind == "skip" and "no CUDA device on this machine" in msg and _ext.load_error() in msg, (kind, msg)


@pytest.mark.parametrize("var, value", [("BLIPFAST_BUILD_CUDA", "0"), ("BLIPFAST_BUILD_CUDA", " 0 "),
                                        ("BLIPFAST_DISABLE_C", "1")])
def test_with_a_cuda_device_and_the_extension_switched_off_it_skips(extension_state, monkeypatch, var, value):
    extension_state("missing", cuda=True)
    monkeypatch.setenv(var, value)
    kind, msg = _outcome()
    assert kind == "skip" and (f"switched off by {var}" in msg or f"disabled by {var}" in msg), (kind, msg)


def test_with_a_cuda_device_and_build_cuda_auto_or_1_it_fails(extension_state, monkeypatch):
    extension_state("abi", cuda=True)
    for value in ("auto", "1"):
        monkeypatch.setenv("BLIPFAST_BUILD_CUDA", value)
        assert _outcome()[0] == "fail", value


def test_the_extension_marker_runs_the_check_before_the_test(extension_state):
    """conftest.py's pytest_runtest_setup (extension_setup): a test marked ``extension`` goes through
    require_extension, an unmarked one does not."""
    extension_state("abi", cuda=True)
    marked = types.SimpleNamespace(get_closest_marker=lambda name: object() if name == "extension" else None)
    assert _outcome(lambda: extension_setup(marked))[0] == "fail"
    extension_setup(types.SimpleNamespace(get_closest_marker=lambda name: None))


def test_the_check_passes_the_loaded_extension_through(extension_state, monkeypatch):
    fake = types.ModuleType(_ext.NAME)
    extension_state("missing", cuda=True)
    monkeypatch.setitem(sys.modules, _ext.NAME, fake)
    _ext._load.cache_clear()
    assert require_extension() is fake and _ext.load_error() is None and _outcome() == ("pass", "")


@pytest.mark.parametrize("cuda", [False, True])
def test_blipfast_info_prints_the_load_error(extension_state, monkeypatch, capsys, cuda):
    extension_state("abi", cuda=cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert _ext.run(None) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["extension"] is False and ABI_ERROR in info["extension_error"]
    assert f"blipfast._C is not available: does not load: ImportError: {ABI_ERROR}" in err
    assert "rebuild it against the installed torch" in err


def test_blipfast_info_with_the_extension_switched_off_names_the_switch(extension_state, monkeypatch, capsys):
    extension_state("missing", cuda=False)
    monkeypatch.setenv("BLIPFAST_DISABLE_C", "1")
    _ext._load.cache_clear()
    _ext.run(None)
    out, err = capsys.readouterr()
    assert json.loads(out)["extension_error"] == "disabled by BLIPFAST_DISABLE_C=1"
    assert "disabled by BLIPFAST_DISABLE_C=1" in err and "rebuild" not in err
