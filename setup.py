"""Build of blipfast: the Python package plus, when possible, the CUDA extension blipfast._C.

Environment:
  BLIPFAST_BUILD_CUDA  auto (default): build csrc/ when torch has CUDA and nvcc is found, else warn and
                       install the pure-Python package; 1: require the build; 0: skip it.
  BLIPFAST_CUDA_ARCHS  ";"-separated compute capabilities, default "80;90a" (A100 and Hopper with wgmma).
  MAX_JOBS             parallel compile jobs (torch's ninja build).
"""
import glob
import os
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
        out.append(f"{digits[:-1]}.{digits[-1]}{suffix}")
    return ";".join(out)


def cuda_extension():
    if MODE == "0":
        return [], {}
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
    ext = CUDAExtension(
        name="blipfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
                     f"-DBLIPFAST_CUDA_ARCHS=\"{archs}\""],
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
