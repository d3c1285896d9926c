"""Builds the C++ extension tvlars_fused._C (csrc/): the CPU ops always, the CUDA ops when torch
has CUDA and nvcc is found. Environment: TVLARS_FUSED_BUILD_EXT=0 skips the extension entirely;
TVLARS_FUSED_BUILD_CUDA=1/0 forces the CUDA ops on/off. The package works without the extension
(other backends are picked)."""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("TVLARS_FUSED_BUILD_EXT", "1") != "0" and glob.glob("csrc/*.cpp"):
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("TVLARS_FUSED_BUILD_CUDA")
    with_cuda = (force == "1") or (force is None and torch.version.cuda is not None and CUDA_HOME is not None)
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/*.cu"))
        ext = CUDAExtension("tvlars_fused._C", sources, define_macros=[("TVLARS_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]})
    else:
        ext = CppExtension("tvlars_fused._C", sources, extra_compile_args={"cxx": cxx})
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
