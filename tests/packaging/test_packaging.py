"""Packaging: the sdist carries everything a CUDA build from it needs, and setup.py's decision to build the
CUDA extension (BLIPFAST_BUILD_CUDA=auto|0|1 against torch's and nvcc's CUDA versions), without a build.

.ci/run goes further: it builds an sdist and a wheel from a clean copy of the checkout and compiles the
extension from the sdist.
"""
from __future__ import annotations

import os
import pathlib
import re
import runpy
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

from tests.helpers.runtime import ROOT


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions, without running setup() (it only runs as __main__)."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="blipfast_setup")


def _clean_copy(dst: pathlib.Path) -> pathlib.Path:
    """The checkout as a fresh clone would have it (tracked and untracked-not-ignored files), else the tree
    without build outputs (an unpacked sdist has no .git)."""
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "results")
        shutil.copytree(ROOT, dst, ignore=ignore)
        return dst
    for rel in filter(None, listed.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """An sdist built from a clean copy with BLIPFAST_BUILD_CUDA=0 (no ext_modules then, so only MANIFEST.in
    brings csrc/ in)."""
    src = _clean_copy(tmp_path_factory.mktemp("src") / "blipfast")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, BLIPFAST_BUILD_CUDA="0")
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / run.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist_names(sdist):
    """Member names of the sdist, relative to its top folder."""
    with tarfile.open(sdist) as tar:
        return {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}


def _local_includes(path: pathlib.Path) -> set[str]:
    """Files named by ``#include "..."`` in path, recursively, relative to ROOT (quoted includes resolve
    beside the file or in csrc/, setup.py's include dir)."""
    seen, todo = set(), [path]
    while todo:
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', todo.pop().read_text(), flags=re.M):
            for cand in (path.parent / name, ROOT / "csrc" / name):
                rel = cand.resolve().relative_to(ROOT).as_posix()
                if cand.is_file() and rel not in seen:
                    seen.add(rel)
                    todo.append(cand)
                    break
    return seen


def test_sdist_carries_every_source_and_header_of_the_extension(setup_py, sdist_names):
    sources = setup_py["extension_sources"](str(ROOT))
    assert sources and all(s.startswith("csrc/") for s in sources)
    needed = set(sources)
    for s in sources:
        needed |= _local_includes(ROOT / s)
    assert "csrc/philox.cuh" in needed  # the header the sdist used to miss
    assert "csrc/layernorm_epilogue.cuh" in needed  # shared by the epilogue's forward, backward and registration
    # everything else the build or its checks read: the standalone CMake build, README (pyproject's readme)
    needed |= {"setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", "MANIFEST.in"}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").glob("*.py")}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.is_file()}
    missing = sorted(needed - sdist_names)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in)"
    assert not [n for n in sdist_names if n.endswith((".so", ".pyc")) or n.startswith("build/")]


# ---- BLIPFAST_BUILD_CUDA: the decision, with fake versions --------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "1"])
def test_matching_cuda_majors_build(setup_py, mode):
    for torch_cuda, nvcc_version in (("13.0", "13.0"), ("12.4", "12.8"), ("12.8", "12.1")):  # minor: torch warns
        assert setup_py["cuda_skip_reason"](torch_cuda, "/opt/cuda/bin/nvcc", nvcc_version) is None
        assert setup_py["decide"](mode, None) is True


def test_auto_skips_with_a_warning_when_nvcc_major_differs_from_torch(setup_py):
    reason = setup_py["cuda_skip_reason"]("12.8", "/usr/local/cuda-13.0/bin/nvcc", "13.0")
    assert reason and "13.0" in reason and "12.8" in reason and "major" in reason
    with pytest.warns(UserWarning, match=r"without the CUDA extension .*CUDA 13\.0 but torch .*CUDA 12\.8"):
        assert setup_py["decide"]("auto", reason) is False


def test_build_cuda_1_fails_loudly_when_nvcc_major_differs(setup_py):
    reason = setup_py["cuda_skip_reason"]("13.0", "/usr/local/cuda-12.4/bin/nvcc", "12.4")
    with pytest.raises(SystemExit, match=r"BLIPFAST_BUILD_CUDA=1 .*CUDA 12\.4 but torch .*CUDA 13\.0"):
        setup_py["decide"]("1", reason)


@pytest.mark.parametrize("torch_cuda, nvcc, version, words", [
    (None, "/x/nvcc", "13.0", "CPU build"),
    ("13.0", None, None, "nvcc not found"),
    ("13.0", "/x/nvcc", None, "cannot read"),
])
def test_other_reasons_not_to_build(setup_py, torch_cuda, nvcc, version, words):
    reason = setup_py["cuda_skip_reason"](torch_cuda, nvcc, version)
    assert words in reason
    with pytest.raises(SystemExit, match=words):
        setup_py["decide"]("1", reason)
    with pytest.warns(UserWarning, match=words):
        assert setup_py["decide"]("auto", reason) is False


def test_build_mode_is_validated(setup_py):
    assert setup_py["build_mode"]({}) == "auto"
    assert setup_py["build_mode"]({"BLIPFAST_BUILD_CUDA": " 1 "}) == "1"
    with pytest.raises(SystemExit, match="must be auto, 0 or 1"):
        setup_py["build_mode"]({"BLIPFAST_BUILD_CUDA": "yes"})


def test_nvcc_release_is_read_from_nvcc_version(setup_py, tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    assert setup_py["nvcc_release"](str(nvcc)) == "12.4"
    nvcc.write_text("#!/bin/sh\necho garbage\n")
    assert setup_py["nvcc_release"](str(nvcc)) is None
    assert setup_py["nvcc_release"](str(tmp_path / "missing")) is None


def test_every_declared_dependency_is_imported_by_blipfast():
    """pyproject's dependencies are what blipfast (the package and its Triton kernels) imports, no more."""
    deps = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), flags=re.M | re.S)
    names = [re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in re.findall(r'"([^"]+)"', deps.group(1))]
    assert "torch" in names
    code = "\n".join(p.read_text() for d in ("blipfast", "kernels") for p in (ROOT / d).rglob("*.py"))
    modules = {"pillow": "PIL", "pyyaml": "yaml"}  # distribution name -> import name, where they differ
    unused = [n for n in names
              if not re.search(rf"^\s*(import|from)\s+{re.escape(modules.get(n, n).replace('-', '_'))}\b", code,
                               flags=re.M)]
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"


# ---- the checkout never shadows an installed top-level package (issue: `kernels` vs HF's `kernels`) ----------


def _checkout_top_level_names() -> dict[str, pathlib.Path]:
    """Names that ``import NAME`` resolves to a regular package or module of the checkout when the checkout is on
    sys.path (``python -m ...`` and pytest run from the repository root put it there)."""
    names = {}
    for p in ROOT.iterdir():
        if p.is_dir() and (p / "__init__.py").is_file():
            names[p.name] = p
        elif p.is_file() and p.suffix in (".py", ".so", ".pyd"):
            names[p.name.split(".")[0]] = p
    return names


def test_no_top_level_package_of_the_checkout_shadows_an_installed_distribution():
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    names = _checkout_top_level_names()
    assert "blipfast" in names
    clash = {n: installed[n] for n in names if n != "blipfast" and n in installed}
    assert not clash, f"the checkout's top-level {sorted(clash)} would shadow the installed {clash}"
    # the Triton sources' folder is never a regular package, installed `kernels` distribution or not
    assert (ROOT / "kernels" / "attention.py").is_file()
    assert "kernels" not in names, "kernels/__init__.py makes the checkout shadow HF's `kernels` distribution"


def _run_from(cwd, code, env=None, args=()):
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_from_the_checkout_root_kernels_is_the_installed_distribution_and_transformers_imports():
    """``python -c``/``python -m`` from the repository root put it first on sys.path (as pytest does): ``import kernels``
    must still find the installed distribution (transformers >= 5.25 imports it from transformers.activations), and
    blipfast.kernels must hold the Triton kernels of kernels/."""
    import importlib.util

    out = _run_from(ROOT, "import kernels, transformers.activations, blipfast, blipfast.kernels.attention as a\n"
                          "print(getattr(kernels, '__file__', None)); print(a.__file__)")
    kernels_file, attention_file = out.strip().splitlines()
    assert kernels_file == "None" or not pathlib.Path(kernels_file).resolve().is_relative_to(ROOT), kernels_file
    if importlib.util.find_spec("kernels") is not None and kernels_file != "None":
        assert "site-packages" in kernels_file or "dist-packages" in kernels_file, kernels_file
    assert pathlib.Path(attention_file).resolve() == ROOT / "kernels" / "attention.py"


def test_pytest_collects_from_the_checkout_root():
    """The README's test command from the root: collection imports transformers through blipfast."""
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/models/test_patch.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a clean copy of the checkout with BLIPFAST_BUILD_CUDA=0 (pure Python)."""
    src = _clean_copy(tmp_path_factory.mktemp("wsrc") / "blipfast")
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, BLIPFAST_BUILD_CUDA="0")
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / run.stdout.strip().splitlines()[-1]


def test_the_wheel_ships_the_triton_kernels_as_blipfast_kernels_only(setup_py, wheel, tmp_path):
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    want = {f"blipfast/kernels/{m}.py" for m, _ in setup_py["kernel_modules"](str(ROOT))} | {
        "blipfast/kernels/__init__.py"}
    assert {"blipfast/kernels/attention.py", "blipfast/kernels/itc.py"} <= want
    assert want <= set(names), f"the wheel lacks {sorted(want - set(names))}"
    assert not [n for n in names if n.split("/")[0] in ("kernels", "tests", "benchmarks")], "top-level clutter"
    # installed from the wheel (unpacked: a pure-Python wheel), imported away from the checkout
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = _run_from(tmp_path, "import blipfast.kernels as k, blipfast.kernels.attention as a, blipfast.kernels.itc\n"
                              "print(a.__file__); print(list(k.__path__))", env=env)
    attention_file, path = out.strip().splitlines()
    assert pathlib.Path(attention_file).resolve() == (tmp_path / "site" / "blipfast" / "kernels" / "attention.py")
    assert str(ROOT) not in path, path


# ---- one version string: blipfast/__init__.py's __version__, which pyproject.toml reads -------------------------


def _metadata_version(text: str) -> str:
    return re.search(r"^Version: (\S+)$", text, flags=re.M).group(1)


def test_the_wheel_and_the_sdist_carry_blipfast_version(wheel, sdist):
    import zipfile

    import blipfast

    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", blipfast.__version__), blipfast.__version__
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        assert _metadata_version(zf.read(meta).decode()) == blipfast.__version__
    with tarfile.open(sdist) as tar:
        pkg_info = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        assert _metadata_version(tar.extractfile(pkg_info).read().decode()) == blipfast.__version__
    assert f"-{blipfast.__version__}" in wheel.name and f"-{blipfast.__version__}." in sdist.name
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"], "pyproject.toml holds a second version string"


def test_setuptools_reads_the_version_without_importing_blipfast_or_torch(tmp_path):
    """pyproject.toml's dynamic version is read statically from the literal in blipfast/__init__.py: a metadata
    build imports neither blipfast (which imports torch) nor torch."""
    import blipfast

    src = _clean_copy(tmp_path / "src")
    code = ("import sys; from setuptools import build_meta as b; out = sys.argv[1]; "  # setup.py's run resets sys.argv
            "d = b.prepare_metadata_for_build_wheel(out); "
            "print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'blipfast'})); "
            "print(open(f'{out}/{d}/METADATA').read())")
    out = _run_from(src, code, env=dict(os.environ, BLIPFAST_BUILD_CUDA="0"), args=[str(tmp_path)])
    imported = re.search(r"^IMPORTED (.*)$", out, flags=re.M).group(1)
    assert imported == "[]", f"reading the version imported {imported}"
    assert _metadata_version(out) == blipfast.__version__
