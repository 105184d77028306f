"""Build of blipfast: the Python package plus, when possible, the CUDA extension blipfast._C.

Environment:
  BLIPFAST_BUILD_CUDA  auto (default): build csrc/ when torch has CUDA and nvcc is found, else warn and
                       install the pure-Python package; 1: require the build; 0: skip it.
  BLIPFAST_CUDA_ARCHS  ";"-separated compute capabilities, default "80;90a" (A100 and Hopper with wgmma).
  MAX_JOBS             parallel compile jobs (torch's ninja build).
"""
import glob
import os
import re
import shutil
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("BLIPFAST_BUILD_CUDA", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    raise SystemExit(f"BLIPFAST_BUILD_CUDA must be auto, 0 or 1, got {MODE!r}")


def _skip(reason):
    if MODE == "1":
        raise SystemExit(f"BLIPFAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    warnings.warn(f"blipfast: building without the CUDA extension ({reason}); the Triton and PyTorch "
                  f"backends stay available")
    return [], {}


def _arch_list(archs):
    """'80;90a' -> '8.0;9.0a' (torch's TORCH_CUDA_ARCH_LIST spelling)."""
    out = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        if "." in a:
            out.append(a)
            continue
        suffix = a[-1] if a[-1].isalpha() else ""
        digits = a[:-1] if suffix else a
        if not digits.isdigit() or len(digits) < 2:
            raise SystemExit(f"BLIPFAST_CUDA_ARCHS: cannot read {a!r} in {archs!r} (want e.g. \"80;90a\")")
        out.append(f"{digits[:-1]}.{digits[-1]}{suffix}")
    if not out:
        raise SystemExit(f"BLIPFAST_CUDA_ARCHS is empty ({archs!r})")
    return ";".join(out)


def _toolkit_ok(home):
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
        os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))


def _find_cuda_home():
    """Point CUDA_HOME at a toolkit with nvcc *and* its headers before torch.utils.cpp_extension reads it.

    torch takes the parent of the ``nvcc`` on PATH when CUDA_HOME is unset; where that nvcc is a wrapper
    script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc), that parent has no CUDA headers and host
    (.cpp) files then miss cuda_runtime_api.h. An explicit CUDA_HOME/CUDA_PATH is always kept.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    which = shutil.which("nvcc")
    cands = [os.path.dirname(os.path.dirname(os.path.realpath(which)))] if which else []
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in cands:
        if _toolkit_ok(home):
            os.environ["CUDA_HOME"] = home
            return


def cuda_extension():
    if MODE == "0":
        return _skip("BLIPFAST_BUILD_CUDA=0")
    _find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return _skip(f"torch is not importable: {exc}")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU build")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return _skip("nvcc not found (set CUDA_HOME)")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return _skip("no sources in csrc/")
    archs = os.environ.get("BLIPFAST_CUDA_ARCHS", "80;90a")
    os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list(archs)
    # the archs reach build_info() as one preprocessor token ("80;90a" -> 80_90a): a quoted string with a ';'
    # does not survive the shell that ninja runs each compile command in
    token = "_".join(re.sub(r"\W", "", a) for a in _arch_list(archs).split(";"))
    defines = [f"-DBLIPFAST_CUDA_ARCHS_TOKEN={token}"]
    ext = CUDAExtension(
        name="blipfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"] + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=find_packages(include=["blipfast", "blipfast.*"]) + ["blipfast.kernels"],
    package_dir={"blipfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
