"""Build of blipfast: the Python package plus, when possible, the CUDA extension blipfast._C.

Environment:
  BLIPFAST_BUILD_CUDA  auto (default): build csrc/ when torch has CUDA and an nvcc of the same CUDA major
                       version is found, else warn and install the pure-Python package; 1: require the
                       build (fail loudly when it cannot be done); 0: skip it.
  BLIPFAST_CUDA_ARCHS  ";"-separated compute capabilities, default "80;90a" (A100 and Hopper with wgmma).
  MAX_JOBS             parallel compile jobs (torch's ninja build).
"""
import glob
import os
import re
import shutil
import subprocess
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative: setuptools wants extension sources relative to setup.py


def build_mode(env=os.environ):
    mode = env.get("BLIPFAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"BLIPFAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def nvcc_release(nvcc):
    """'13.0' from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88"); None if unreadable."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def cuda_skip_reason(torch_cuda, nvcc, nvcc_version):
    """Why the CUDA extension cannot be built here, or None when it can.

    torch_cuda: torch.version.cuda (None for a CPU build of torch); nvcc: the nvcc path (None if not found);
    nvcc_version: its release, e.g. "12.4" (None if unreadable). torch's BuildExtension refuses an nvcc whose
    CUDA major version differs from torch's (a minor difference only warns), so that is decided here first.
    """
    if torch_cuda is None:
        return "torch is a CPU build (torch.version.cuda is None)"
    if not nvcc:
        return "nvcc not found (set CUDA_HOME)"
    if nvcc_version is None:
        return f"cannot read the CUDA release of {nvcc} from `nvcc --version`"
    if nvcc_version.split(".")[0] != str(torch_cuda).split(".")[0]:
        return (f"{nvcc} is CUDA {nvcc_version} but torch was built with CUDA {torch_cuda}; the major versions "
                f"must match (point CUDA_HOME at a CUDA {str(torch_cuda).split('.')[0]}.x toolkit)")
    return None


def decide(mode, reason):
    """True: build the extension. False: skip it with a warning (auto/0). BLIPFAST_BUILD_CUDA=1 and a reason
    not to build: SystemExit naming the reason."""
    if reason is None:
        return True
    if mode == "1":
        raise SystemExit(f"BLIPFAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    warnings.warn(f"blipfast: building without the CUDA extension ({reason}); the Triton and PyTorch "
                  f"backends stay available")
    return False


def extension_sources(root=ROOT):
    """The extension's sources, relative to ``root``: csrc/*.cpp and csrc/*.cu (headers come via CSRC)."""
    found = glob.glob(os.path.join(root, CSRC, "*.cpp")) + glob.glob(os.path.join(root, CSRC, "*.cu"))
    return sorted(os.path.relpath(f, root) for f in found)


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
    mode = build_mode()
    if mode == "0":
        decide(mode, "BLIPFAST_BUILD_CUDA=0")
        return [], {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        decide(mode, f"torch is not importable: {exc}")
        return [], {}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        nvcc = None
    reason = cuda_skip_reason(torch.version.cuda, nvcc, nvcc_release(nvcc) if nvcc else None)
    sources = extension_sources()
    if reason is None and not sources:
        reason = f"no sources in {CSRC}/"
    if not decide(mode, reason):
        return [], {}
    archs = os.environ.get("BLIPFAST_CUDA_ARCHS", "80;90a")
    os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list(archs)
    # the archs reach build_info() as one preprocessor token ("80;90a" -> 80_90a): a quoted string with a ';'
    # does not survive the shell that ninja runs each compile command in
    token = "_".join(re.sub(r"\W", "", a) for a in _arch_list(archs).split(";"))
    defines = [f"-DBLIPFAST_CUDA_ARCHS_TOKEN={token}"]
    ext = CUDAExtension(
        name="blipfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={
            "cxx": ["-O3"] + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


KERNELS = "kernels"  # the Triton sources: shipped as blipfast.kernels, never a top-level package


def kernel_modules(root=ROOT):
    """The Triton kernel modules of the top-level kernels/ folder, as (module name, path relative to root)."""
    found = glob.glob(os.path.join(root, KERNELS, "*.py"))
    return sorted((os.path.splitext(os.path.basename(f))[0], os.path.relpath(f, root)) for f in found)


class build_py(_build_py):
    """Adds kernels/*.py to the package blipfast.kernels (whose __init__.py lives in blipfast/kernels/).

    kernels/ has no __init__.py on purpose: a checkout on sys.path must not shadow the installed ``kernels``
    distribution that transformers imports. package_dir cannot map a package without __init__.py in an
    editable install, so the wheel gets the modules copied here and a checkout finds them through
    blipfast/kernels/__init__.py's search path.
    """

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "blipfast.kernels":
            modules += [(package, name, path) for name, path in kernel_modules()]
        return modules


if __name__ == "__main__":  # pip/build run setup.py as __main__; tests import the functions above
    ext_modules, cmdclass = cuda_extension()
    setup(
        packages=find_packages(include=["blipfast", "blipfast.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_py": build_py, **cmdclass},
    )
