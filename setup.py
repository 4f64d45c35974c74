"""Builds the Kasmina extension `esper._C`. Package metadata lives in pyproject.toml.

CPU sources are always compiled. CUDA sources (csrc/cuda/*.cu) are added when torch was built
with CUDA and CUDA_HOME is set, or when FORCE_CUDA=1; USE_CUDA=0 forces a CPU-only build.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("USE_CUDA", "") == "0":
        return False
    if os.environ.get("FORCE_CUDA", "") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    extra = {"cxx": ["-O3"]}
    if _want_cuda():
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        extra["cxx"].append("-DESPER_WITH_CUDA")
        extra["nvcc"].append("-DESPER_WITH_CUDA")
        return CUDAExtension(
            "esper._C", sources + rel("csrc/cuda/*.cu"), include_dirs=include_dirs, extra_compile_args=extra
        )
    return CppExtension("esper._C", sources, include_dirs=include_dirs, extra_compile_args=extra)


# `make build` installs the package metadata (console scripts) with ESPER_SKIP_EXTENSION=1 and
# builds the extension separately, so a metadata change does not recompile C++.
setup(
    ext_modules=[] if os.environ.get("ESPER_SKIP_EXTENSION") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
