"""Test setup. Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter,
which must be switched on before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tests run on tiny tensors, where intra-op threads only add OpenMP barriers: on a busy machine
# (CI's 2 cores shared with other work) a 2-thread barrier can cost 100x the arithmetic. Tests of
# the multithreaded paths set their thread counts themselves. TVLARS_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TVLARS_TEST_THREADS", "1")))

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
