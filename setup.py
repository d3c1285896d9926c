"""Builds the C++ extension tvlars_fused._C (csrc/): the CPU ops always, the CUDA ops when torch
has CUDA and nvcc is found. Environment: TVLARS_FUSED_BUILD_EXT=0 skips the extension entirely;
TVLARS_FUSED_BUILD_CUDA=1/0 forces the CUDA ops on/off. The package works without the extension
(other backends are picked).

`pip install --no-build-isolation -e .` (make install) compiles it in place, next to the sources,
so `import tvlars_fused._C` works from the source tree."""
import glob
import os
import shutil

from setuptools import setup


def find_cuda_home():
    """The CUDA toolkit root to link against, or None (torch then guesses). torch's guess is wrong
    where nvcc is a wrapper outside the toolkit (the link fails with `cannot find -lcudart`): a
    root must hold bin/nvcc and a linkable libcudart.so. A CUDA_HOME set by the user always wins."""
    def linkable(root):
        return os.path.exists(os.path.join(root, "bin", "nvcc")) and any(
            glob.glob(os.path.join(root, sub, "libcudart.so"))
            for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"))

    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    roots = [os.path.dirname(os.path.dirname(p)) for p in ((nvcc, os.path.realpath(nvcc)) if nvcc else ())]
    roots += sorted(glob.glob("/usr/local/cuda*"), reverse=True) + ["/usr/lib/cuda"]
    return next((root for root in roots if linkable(root)), None)

# Compiler flags (tests/test_nvcc.py compiles the .cu with this NVCC_FLAGS list, read from here):
#  - no FMA contraction on the host, so the CPU kernel's bits do not depend on the instruction set
#    the compiler picks (the device side uses explicitly rounded intrinsics, csrc/arith.h);
#  - OpenMP, which at::parallel_for needs to run in parallel inside an extension (the library
#    resolves to the libgomp that torch loaded);
#  - -Wno-psabi: GCC notes that 64-byte vector arguments changed ABI in GCC 4.6; ours are inlined;
#  - C++20, as torch's BuildExtension uses for torch 2.13's headers;
#  - no --use_fast_math: it would make division and sqrt approximate and flush denormals, and
#    the kernels are memory bound anyway.
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo"]

ext_modules, cmdclass = [], {}
if os.environ.get("TVLARS_FUSED_BUILD_EXT", "1") != "0" and glob.glob("csrc/*.cpp"):
    cuda_home = find_cuda_home()
    if cuda_home:   # before torch.utils.cpp_extension reads it
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("TVLARS_FUSED_BUILD_CUDA")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if force == "1":
        if torch.version.cuda is None:
            raise RuntimeError(f"TVLARS_FUSED_BUILD_CUDA=1 but torch {torch.__version__} was built without "
                               "CUDA, so a CUDA extension cannot be linked against it")
        with_cuda = True
    elif force == "0":
        with_cuda = False
    else:
        with_cuda = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    sources = sorted(glob.glob("csrc/*.cpp"))
    kwargs = dict(extra_link_args=["-fopenmp"], depends=sorted(glob.glob("csrc/*.h") + glob.glob("csrc/algo/*.h")))
    if with_cuda:
        sources += sorted(glob.glob("csrc/*.cu"))
        ext = CUDAExtension("tvlars_fused._C", sources, define_macros=[("TVLARS_WITH_CUDA", None)],
                            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, **kwargs)
    else:
        ext = CppExtension("tvlars_fused._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, **kwargs)
    what = f"the C++ and CUDA ops (CUDA_HOME={cuda_home or 'torch guesses'})" if with_cuda else "the C++ ops"
    print(f"tvlars_fused: building {what}")
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
