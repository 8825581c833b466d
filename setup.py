"""Builds the optional CUDA extension `ceu_kernels._C` from csrc/ where torch has CUDA and nvcc exists.

Everywhere else (a CPU-only torch, no nvcc, no torch at build time) it installs the pure-Python package.
torch is imported lazily so that it is never a build requirement.
"""
import glob
import os
import shutil

from setuptools import setup


def cuda_extension_kwargs():
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources or os.environ.get("CEU_NO_CUDA_BUILD"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return {}
    extension = CUDAExtension(
        name="ceu_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extension_kwargs())
