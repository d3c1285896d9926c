"""Print the CUDA toolkit root to build the extension against (for CUDA_HOME), or nothing.

torch's own guess is wrong where nvcc is a wrapper outside the toolkit (the link then fails with
`cannot find -lcudart`): a candidate must hold bin/nvcc and a linkable libcudart.so.
"""
import glob
import os
import shutil


def linkable(root: str) -> bool:
    return os.path.exists(os.path.join(root, "bin", "nvcc")) and any(
        glob.glob(os.path.join(root, sub, "libcudart.so"))
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"))


def candidates():
    if os.environ.get("CUDA_HOME"):
        yield os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        for path in (nvcc, os.path.realpath(nvcc)):
            yield os.path.dirname(os.path.dirname(path))
    yield from sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    yield "/usr/lib/cuda"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME:
            yield CUDA_HOME
    except Exception:
        pass


for root in candidates():
    if linkable(root):
        print(root)
        break
