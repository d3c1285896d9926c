"""Capturable: on a GPU the whole optimizer step is captured in a CUDA graph and replayed, and a
step after warm-up allocates nothing and never syncs. Skipped without a GPU.

The cases are tests/backend_cases.py's on the CUDA device, for every backend that can run there
("triton", "cuda", "torch") and both classes: ids [cuda-triton], [cuda-cuda], [cuda-torch] (TVLARS)
and [cuda-triton-LAMB], ... (LAMB); HYPER holds each class's options."""
import pytest
import torch

from backend_cases import backend_cases, params
from conftest import requires_cuda

pytestmark = requires_cuda

# every CUDA backend of every class (generated on any machine: without a GPU they are skipped)
GPU_CASES = params(backend_cases(["cuda"], names=("triton", "cuda", "torch")))
HYPER = {"TVLARS": dict(lr=0.3, momentum=0.9, weight_decay=1e-3, lmbda=0.05),
         "LAMB": dict(lr=0.02, betas=(0.8, 0.95), weight_decay=1e-2)}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).cuda()


@pytest.mark.parametrize("case", GPU_CASES)
def test_step_captured_in_cuda_graph_replays_like_eager(case):
    m_g, m_e = _net(), _net()
    kw = dict(HYPER[case.algo], lr=torch.tensor(HYPER[case.algo]["lr"], device="cuda"))
    o_g = case.optimizer(**kw)(m_g.parameters())
    o_e = case.optimizer(**dict(kw, lr=kw["lr"].clone()))(m_e.parameters())
    x = torch.randn(32, 64, device="cuda")
    # grads fixed for the captured region: compute once, keep (same for eager)
    for m, o in ((m_g, o_g), (m_e, o_e)):
        o.zero_grad()
        m(x).square().mean().backward()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):           # warm-up on a side stream, as torch.cuda.graphs requires
            o_g.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_g.step()
    for _ in range(3):
        o_e.step()                   # the eager run: the warm-up steps (capture records, runs nothing)
    torch.cuda.synchronize()
    assert float(o_g.step_count) == float(o_e.step_count) == 3
    for _ in range(5):
        graph.replay()
        o_e.step()
    torch.cuda.synchronize()
    assert float(o_g.step_count) == float(o_e.step_count) == 8
    for a, b in zip(m_g.parameters(), m_e.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", GPU_CASES)
def test_step_allocates_nothing_and_never_syncs_after_warmup(case):
    m = _net()
    opt = case.optimizer(**HYPER[case.algo])(m.parameters())
    x = torch.randn(32, 64, device="cuda")

    def it():
        opt.zero_grad()
        m(x).square().mean().backward()
    for _ in range(3):
        it()
        opt.step()
    it()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()["allocation.all.allocated"]
    if case.backend != "torch":  # the torch backend allocates temporaries by design
        assert after == before, f"{after - before} allocations in 3 steps"
