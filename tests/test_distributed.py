"""PyTorch's distributed engines, for real: 2 processes on 127.0.0.1 with the gloo backend.

- DDP: the fused optimizer after DDP's gradient all-reduce gives, on every rank, the parameters of
  a single-process run on the full batch;
- FSDP2 (fully_shard): parameters are sharded DTensors (uneven and empty local shards included);
  the layer-wise norms come from all-reduced partial sums; the gathered parameters equal a
  single-process run.

Each for TVLARS (ids `ddp-torch`, `fsdp2-auto`, ...) and LAMB (`ddp-torch-LAMB`,
`fsdp2-auto-LAMB`, ...). Starting the two processes is what costs (~5 s here), so one spawn per
(engine, backend) runs every class, one after the other in the same process group, and the tests
of that (engine, backend) share its results (`_runs`).
"""
import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tvlars_fused
from tvlars_fused import reference
from tvlars_fused.kernels import available_backends

from backend_cases import ALGORITHMS

WORLD = 2
STEPS = 5
# (TVLARS with dampening: the first update is torch's first buffer, marked in the stats row, which a
# sharded bucket finalizes twice per step)
HYPER = {"TVLARS": dict(lr=0.4, momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05, delay_steps=2,
                        weight_decay_filter=True, norm_clip=50.0, dampening=0.3),
         "LAMB": dict(lr=0.05, betas=(0.8, 0.95), weight_decay=1e-2, weight_decay_filter=True,
                      weight_norm_clip=50.0)}
ALGOS = tuple(HYPER)


def _backends():
    return available_backends("cpu", ("torch", "cpu"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    # Linear(5, 1): weight [1, 5] and bias [1] leave rank 1 an empty shard; 7 rows shard 4/3.
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64),
             torch.randn(8, 1, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def _single_process(algo):
    m = _model()
    opt = getattr(reference, algo)(m.parameters(), **HYPER[algo])
    for x, y in _batches():
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


@functools.lru_cache(maxsize=None)
def _cpu_mesh():
    """FSDP2's default mesh is on the accelerator when there is one: these gloo runs stay on CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (WORLD,))


def _worker(rank, port, engine, backend, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        info = {algo: _run_one(rank, engine, backend, algo) for algo in ALGOS}
        torch.save(info, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()   # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _run_one(rank, engine, backend, algo):
    """STEPS steps of `algo` on a fresh (wrapped) model; what the test compares."""
    m = _model()
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(m)
    else:
        from torch.distributed.fsdp import fully_shard
        mesh = _cpu_mesh()
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        model = fully_shard(m, mesh=mesh)
    opt = getattr(tvlars_fused, algo)(model.parameters(), backend=backend, **HYPER[algo])
    for x, y in _batches():
        half = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[half]), y[half]).backward()
        opt.step()
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return {"params": [p.detach().clone() for p in params], "backends": opt.backends,
            "local_numels": [(p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters()],
            "grad_copies": opt.grad_copies, "step": float(opt.step_count),
            "state_keys": sorted({k for st in opt.state.values() for k in st})}


_RUNS = {}


def _runs(engine, backend, tmp_path_factory):
    """Each rank's results for every class, of one spawn per (engine, backend) per session."""
    if (engine, backend) not in _RUNS:
        d = tmp_path_factory.mktemp(f"{engine}-{backend}")
        mp.spawn(_worker, args=(_free_port(), engine, backend, str(d)), nprocs=WORLD, join=True)
        _RUNS[engine, backend] = [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]
    return _RUNS[engine, backend]


CASES = [pytest.param(engine, backend, algo, id=f"{engine}-{backend}" + ("" if algo == "TVLARS" else f"-{algo}"))
         for algo in ALGOS for engine, backend in [("ddp", b) for b in _backends()] + [("fsdp2", "auto"), ("fsdp2", "torch")]]


@pytest.mark.parametrize("engine,backend,algo", CASES)
def test_distributed_matches_single_process(engine, backend, algo, tmp_path_factory):
    expected = _single_process(algo)
    results = [info[algo] for info in _runs(engine, backend, tmp_path_factory)]
    for r, info in enumerate(results):
        assert info["step"] == STEPS
        assert info["state_keys"] == sorted({"step", *ALGORITHMS[algo].state_keys()}), "the class under test"
        for p, e in zip(info["params"], expected):
            assert torch.allclose(p, e, rtol=1e-10, atol=1e-12), f"rank {r}: {(p - e).abs().max()}"
    if engine == "fsdp2":
        assert 0 in results[1]["local_numels"], "the test must include an empty local shard"
        assert results[0]["local_numels"][0] != results[1]["local_numels"][0], "and an uneven one"
        assert results[0]["backends"] == ["torch"], "on CPU the sharded buckets run the torch backend"
    else:
        assert results[0]["grad_copies"] == 0, "DDP's all-reduce writes into the bucket views"


def test_backend_without_sharded_support_is_refused_for_dtensors(tmp_path):
    """Every class (one spawn): backend="cpu" refuses FSDP2's DTensor parameters."""
    if "cpu" not in _backends():
        pytest.skip("the C++ extension is not built")
    mp.spawn(_refusal_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for algo in ALGOS:
        assert (tmp_path / f"refused-{algo}").read_text().startswith("backend='cpu' cannot run FSDP2-sharded"), algo


def _refusal_worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard
        model = fully_shard(_model(), mesh=_cpu_mesh())
        for algo in ALGOS:
            try:
                getattr(tvlars_fused, algo)(model.parameters(), backend="cpu", lr=0.1)
            except ValueError as exc:
                if rank == 0:
                    with open(os.path.join(out_dir, f"refused-{algo}"), "w") as f:
                        f.write(str(exc))
        dist.barrier()
    finally:
        dist.destroy_process_group()
