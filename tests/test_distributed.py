"""PyTorch's distributed engines, for real: 2 processes on 127.0.0.1 with the gloo backend.

- DDP: the fused optimizer after DDP's gradient all-reduce gives, on every rank, the parameters of
  a single-process run on the full batch;
- FSDP2 (fully_shard): parameters are sharded DTensors (uneven and empty local shards included);
  the layer-wise norms come from all-reduced partial sums; the gathered parameters equal a
  single-process run.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tvlars_fused
from tvlars_fused import reference
from tvlars_fused.kernels import available_backends

WORLD = 2
STEPS = 5
HYPER = dict(lr=0.4, momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05, delay_steps=2,
             weight_decay_filter=True, norm_clip=50.0)


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


def _single_process():
    m = _model()
    opt = reference.TVLARS(m.parameters(), **HYPER)
    for x, y in _batches():
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


def _cpu_mesh():
    """FSDP2's default mesh is on the accelerator when there is one: these gloo runs stay on CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (WORLD,))


def _worker(rank, port, engine, backend, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
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
        opt = tvlars_fused.TVLARS(model.parameters(), backend=backend, **HYPER)
        for x, y in _batches():
            half = slice(rank * 4, rank * 4 + 4)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[half]), y[half]).backward()
            opt.step()
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        info = {"params": [p.detach().clone() for p in params], "backends": opt.backends,
                "local_numels": [(p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters()],
                "grad_copies": opt.grad_copies, "step": float(opt.step_count)}
        torch.save(info, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


CASES = [("ddp", b) for b in _backends()] + [("fsdp2", "auto"), ("fsdp2", "torch")]


@pytest.mark.parametrize("engine,backend", CASES)
def test_distributed_matches_single_process(engine, backend, tmp_path):
    mp.spawn(_worker, args=(_free_port(), engine, backend, str(tmp_path)), nprocs=WORLD, join=True)
    expected = _single_process()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, info in enumerate(results):
        assert info["step"] == STEPS
        for p, e in zip(info["params"], expected):
            assert torch.allclose(p, e, rtol=1e-10, atol=1e-12), f"rank {r}: {(p - e).abs().max()}"
    if engine == "fsdp2":
        assert 0 in results[1]["local_numels"], "the test must include an empty local shard"
        assert results[0]["local_numels"][0] != results[1]["local_numels"][0], "and an uneven one"
        assert results[0]["backends"] == ["torch"], "on CPU the sharded buckets run the torch backend"
    else:
        assert results[0]["grad_copies"] == 0, "DDP's all-reduce writes into the bucket views"


def test_backend_without_sharded_support_is_refused_for_dtensors(tmp_path):
    if "cpu" not in _backends():
        pytest.skip("the C++ extension is not built")
    mp.spawn(_refusal_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert (tmp_path / "refused").read_text().startswith("backend='cpu' cannot run FSDP2-sharded")


def _refusal_worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard
        model = fully_shard(_model(), mesh=_cpu_mesh())
        try:
            tvlars_fused.TVLARS(model.parameters(), backend="cpu", lr=0.1)
        except ValueError as exc:
            if rank == 0:
                with open(os.path.join(out_dir, "refused"), "w") as f:
                    f.write(str(exc))
    finally:
        dist.destroy_process_group()
