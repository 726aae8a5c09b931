"""Build script: the Python layer, the Triton kernels (as ``saeengine.kernels``) and,
when a CUDA toolchain is present, the native extension ``saeengine._C`` from csrc/.

Environment (also listed in README.md):
  SAEENGINE_SKIP_CUDA_BUILD=1   never build csrc/ (pure Python + Triton install)
  SAEENGINE_FORCE_CUDA_BUILD=1  build csrc/ or fail loudly with the reason
  TORCH_CUDA_ARCH_LIST          architectures to compile for; default "8.0;9.0" when no
                                GPU is visible (torch's own detection needs a GPU)
  CUDA_HOME                     the toolkit; default /usr/local/cuda when it exists
  MAX_JOBS                      parallel compile jobs (torch's cpp_extension)
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"saeengine setup: {msg}", file=sys.stderr)


def _cuda_build_problem():
    """Return (None, torch) if csrc/ can be built here, else (reason, None)."""
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch would otherwise guess the toolkit from the nvcc wrapper's folder.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
    except ImportError:
        return "torch is not installed in the build environment (use --no-build-isolation)", None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build", None
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        if shutil.which("nvcc") is None:
            return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)", None
    return None, torch


def cuda_extensions():
    if _flag("SAEENGINE_SKIP_CUDA_BUILD"):
        _say("SAEENGINE_SKIP_CUDA_BUILD=1: the CUDA backend (saeengine._C) is not built.")
        return [], {}
    problem, torch = _cuda_build_problem()
    if problem is not None:
        if _flag("SAEENGINE_FORCE_CUDA_BUILD"):
            raise SystemExit(f"saeengine setup: SAEENGINE_FORCE_CUDA_BUILD=1 but {problem}.")
        _say(f"the CUDA backend (saeengine._C) is not built: {problem}. "
             "The torch and Triton backends are installed.")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        _say(f"no GPU visible: compiling for TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="saeengine._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},  # torch picks the C++ standard
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=find_packages(include=["saeengine", "saeengine.*"]) + ["saeengine.kernels", "saeengine.data"],
    package_dir={"saeengine.kernels": "kernels"},
    package_data={"saeengine": ["gpu_validation.json"], "saeengine.data": ["*.tsv"],
                  "saeengine.explore": ["static/*.html", "static/*.js", "static/*.css"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
