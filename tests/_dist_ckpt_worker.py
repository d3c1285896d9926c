"""The per-rank halves of tests/test_checkpoint_distributed.py, and the model, data, optimizers and
comparison helpers that both halves share.

Every worker runs in one of the 2 gloo processes that torch.multiprocessing.spawn starts (rank, then
the arguments the test passes), does all the runs of its case inside those same processes (a run
that is never checkpointed, an uninterrupted run that saves a checkpoint after K steps and goes on
for M more, a resumed run that builds fresh objects, loads that checkpoint and trains the same M
steps) and torch.saves a `snapshot` of each to OUT_DIR/rank<r>.pt. The test compares them bit for bit
(`diff`). An exception in a worker propagates to mp.spawn (and so to the test), with a note naming
the rank and the phase that failed.

Implementations (`impl`): "fused-<backend>" (tvlars_fused.TVLARS(backend=...)), "reference"
(tvlars_fused.reference.TVLARS), the same for LAMB with "-LAMB" appended ("fused-cpu-LAMB",
"reference-LAMB"), and "sgd" (torch.optim.SGD with momentum, the control that proves a test passes
on a correct torch optimizer).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist

if not torch.cuda.is_available():   # as tests/conftest.py: before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tvlars_fused  # noqa: E402
from tvlars_fused import reference  # noqa: E402

WORLD = 2
K, M = 3, 3            # steps before the checkpoint, steps after it
N = K + M
TIMEOUT_S = 60         # a collective that one rank never joins fails instead of hanging the test
# Per class: the constructor's hyperparameters, and the second group's own options: TVLARS the
# paper's momentum form, LAMB decoupled weight decay with torch-optimizer's step-size bias
# correction; both filters (they act on its 1-D parameters; its 2-D head.weight is still decayed
# and adapted) and its own lr.
HYPER = {"TVLARS": dict(lr=0.4, momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05, delay_steps=2),
         "LAMB": dict(lr=0.04, betas=(0.8, 0.95), weight_decay=1e-2)}
SECOND_GROUP = {
    "TVLARS": dict(momentum_form="paper", weight_decay_filter=True, lars_adaptation_filter=True, lr=0.2),
    "LAMB": dict(weight_decay_mode="decoupled", bias_correction="step_size", weight_decay_filter=True,
                 adaptation_filter=True, lr=0.02),
}
PAPER_GROUP = SECOND_GROUP["TVLARS"]
PAPER_MODULES = ("norm", "head")   # the second group's modules
SGD_HYPER = dict(lr=0.4, momentum=0.9, weight_decay=1e-3)
SCHED = dict(step_size=2, gamma=0.5)   # the lr halves after steps 2 and 4: the checkpoint (K=3) falls mid-period
BATCH = 8


# -- model, data, optimizers --------------------------------------------------------------------
class Net(torch.nn.Module):
    """Linear layers with biases and a LayerNorm. Under FSDP2 on 2 ranks, fc1.weight [7, 6],
    fc1.bias and the norm's [7] shard 4/3 (uneven); head.weight [1, 5] and head.bias [1] leave
    rank 1 an empty shard."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.fc2 = torch.nn.Linear(7, 5)
        self.head = torch.nn.Linear(5, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.norm(self.fc1(x))))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=g, dtype=torch.float64))


def local_batch(engine: str, rank: int, step: int):
    """Unwrapped models are replicas (DCP treats plain tensors as replicated): the whole batch on
    every rank. DDP, FSDP2 and ZeRO (over DDP) split it between the ranks."""
    x, y = batch(step)
    if engine == "plain":
        return x, y
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[half], y[half]


def optimizer_spec(impl: str):
    """(class, constructor kwargs, the second group's own options) of an implementation."""
    if impl == "sgd":
        return torch.optim.SGD, dict(SGD_HYPER), {"lr": PAPER_GROUP["lr"]}
    algo = "TVLARS"
    for name in HYPER:
        if impl.endswith(f"-{name}"):
            algo, impl = name, impl[:-len(name) - 1]
    if impl == "reference":
        return getattr(reference, algo), dict(HYPER[algo]), dict(SECOND_GROUP[algo])
    if impl.startswith("fused-"):
        return getattr(tvlars_fused, algo), dict(HYPER[algo], backend=impl[len("fused-"):]), dict(SECOND_GROUP[algo])
    raise ValueError(f"unknown implementation {impl!r}")


def param_groups(net: torch.nn.Module, impl: str) -> List[Dict[str, Any]]:
    """Group 0 (default options): fc1, fc2; group 1 (PAPER_GROUP): norm, head."""
    _, _, second = optimizer_spec(impl)
    first_params, second_params = [], []
    for name, p in net.named_parameters():
        (second_params if name.split(".")[0] in PAPER_MODULES else first_params).append(p)
    return [{"params": first_params}, {"params": second_params, **second}]


def cpu_mesh():
    """FSDP2's default mesh is on the accelerator when there is one: these gloo runs stay on CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (WORLD,))


def build(engine: str, impl: str, mesh=None, bucket_view: bool = False):
    """A fresh (net, model, optimizer, scheduler), the same every time it is called.

    engine: "plain" (no wrapper), "ddp", "fsdp2" (fully_shard on each layer, then the root), or
    "zero" (DDP + ZeroRedundancyOptimizer over the implementation, with parameters_as_bucket_view
    = bucket_view)."""
    net = make_net()
    if engine in ("ddp", "zero"):
        model = torch.nn.parallel.DistributedDataParallel(net)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in (net.fc1, net.norm, net.fc2, net.head):
            fully_shard(layer, mesh=mesh)
        model = fully_shard(net, mesh=mesh)
    elif engine == "plain":
        model = net
    else:
        raise ValueError(f"unknown engine {engine!r}")
    cls, kwargs, _ = optimizer_spec(impl)
    groups = param_groups(net, impl)
    if engine == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        opt = ZeroRedundancyOptimizer(groups, optimizer_class=cls, parameters_as_bucket_view=bucket_view,
                                      **kwargs)
    else:
        opt = cls(groups, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, **SCHED)
    return net, model, opt, sched


def train(model, opt, sched, engine: str, rank: int, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = local_batch(engine, rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


# -- what is compared -----------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _value(v):
    if isinstance(v, torch.Tensor):
        return _local(v).detach().clone()
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_value(x) for x in v)
    return copy.deepcopy(v)


def local_optimizer(opt):
    """The optimizer that holds the state: ZeRO's local one on this rank, else opt itself."""
    return getattr(opt, "optim", opt) if type(opt).__name__ == "ZeroRedundancyOptimizer" else opt


def snapshot(net: torch.nn.Module, opt, sched) -> Dict[str, Any]:
    """This rank's optimizer state (keyed by parameter name; a key that is not a parameter is kept
    as "<key 'step'>"), param_groups' options, the scheduler's state_dict and the parameters (local
    shards under FSDP2): everything the bit-for-bit comparison covers, in the order differences are
    reported."""
    names = {id(p): n for n, p in net.named_parameters()}
    state = {}
    for key, entry in local_optimizer(opt).state.items():
        name = names.get(id(key), "<unknown parameter>") if isinstance(key, torch.Tensor) else f"<key {key!r}>"
        state[name] = _value(entry)
    return {"state": state,
            "groups": [{k: _value(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "sched": _value(sched.state_dict()),
            "params": {n: _value(p) for n, p in net.named_parameters()}}


def diff(expected, got, where: str = "") -> List[str]:
    """Every difference between two snapshots (or parts of them): tensors must be torch.equal, with
    the same dtype and shape; dict keys must match; everything else must compare ==."""
    out: List[str] = []
    if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)):
            out.append(f"{where}: expected {_short(expected)}, got {_short(got)}")
        elif expected.dtype != got.dtype or expected.shape != got.shape:
            out.append(f"{where}: expected {expected.dtype} {tuple(expected.shape)}, "
                       f"got {got.dtype} {tuple(got.shape)}")
        elif not torch.equal(expected, got):
            d = (expected.double() - got.double()).abs().max().item()
            out.append(f"{where}: values differ (max |diff| {d:.3g}): expected {_short(expected)}, "
                       f"got {_short(got)}")
    elif isinstance(expected, dict) and isinstance(got, dict):
        for k in list(expected) + [k for k in got if k not in expected]:   # the snapshot's order
            sub = f"{where}[{k!r}]"
            if k not in got:
                out.append(f"{sub}: missing (expected {_short(expected[k])})")
            elif k not in expected:
                out.append(f"{sub}: unexpected (got {_short(got[k])})")
            else:
                out.extend(diff(expected[k], got[k], sub))
    elif (isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple))
          and len(expected) == len(got)):
        for i, (a, b) in enumerate(zip(expected, got)):
            out.extend(diff(a, b, f"{where}[{i}]"))
    elif type(expected) is not type(got) or expected != got:
        out.append(f"{where}: expected {_short(expected)}, got {_short(got)}")
    return out


def _short(v) -> str:
    if isinstance(v, torch.Tensor):
        flat = v.detach().reshape(-1)
        vals = flat[:3].tolist()
        return f"tensor({vals}{'...' if flat.numel() > 3 else ''}, dtype={v.dtype}, shape={tuple(v.shape)})"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {_short(x)}" for k, x in v.items()) + "}"
    return repr(v)


def all_finite(snap: Dict[str, Any]) -> bool:
    """A bit-for-bit comparison means something only if the run did not blow up."""
    return all(bool(torch.isfinite(p).all()) for p in snap["params"].values())


# -- process plumbing -------------------------------------------------------------------------------
@contextlib.contextmanager
def phase(rank: int, what: str):
    """Name the rank and the phase in any exception that leaves the block."""
    try:
        yield
    except BaseException as exc:
        exc.add_note(f"[rank {rank}] while: {what}")
        raise


def _run(rank: int, port: int, body, *args) -> None:
    """Join the gloo group, run body(rank, *args, out_dir) and save what it returns to
    out_dir/rank<rank>.pt. The body's models, optimizers and DDP reducers are gone (collected)
    before the group is destroyed, so no gloo object outlives it into interpreter shutdown."""
    out_dir = args[-1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)   # bitwise-reproducible forward/backward in every run
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result = body(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        del result
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- 1. torch.distributed.checkpoint ----------------------------------------------------------------
def dcp_worker(rank: int, port: int, engine: str, impl: str, out_dir: str) -> None:
    _run(rank, port, _dcp_runs, engine, impl, out_dir)


def _dcp_runs(rank: int, engine: str, impl: str, out_dir: str) -> Dict[str, Any]:
    """Three runs of `engine` ("plain", "ddp", "fsdp2") with `impl`: never saved; uninterrupted,
    saved with dcp.save after K steps (get_state_dict); resumed: fresh objects, templates from
    get_model_state_dict/get_optimizer_state_dict, dcp.load, set_model_state_dict/
    set_optimizer_state_dict, scheduler load_state_dict, then the same M steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    mesh = cpu_mesh() if engine == "fsdp2" else None
    ckpt = os.path.join(out_dir, "dcp_checkpoint")
    result: Dict[str, Any] = {}

    with phase(rank, f"the never-saved run ({N} steps)"):
        net, model, opt, sched = build(engine, impl, mesh)
        train(model, opt, sched, engine, rank, 0, N)
        result["never_saved"] = snapshot(net, opt, sched)

    net, model, opt, sched = build(engine, impl, mesh)
    result["local_numels"] = {n: _local(p).numel() for n, p in net.named_parameters()}
    with phase(rank, f"the uninterrupted run, steps 0..{K}"):
        train(model, opt, sched, engine, rank, 0, K)
    with phase(rank, f"get_state_dict(model, optimizer) after {K} steps"):
        model_sd, optim_sd = get_state_dict(model, opt)
    with phase(rank, "dcp.save"):
        dcp.save({"model": model_sd, "optim": optim_sd, "sched": sched.state_dict()}, checkpoint_id=ckpt)
    with phase(rank, f"the uninterrupted run, steps {K}..{N} after the save"):
        train(model, opt, sched, engine, rank, K, N)
        result["uninterrupted"] = snapshot(net, opt, sched)

    net, model, opt, sched = build(engine, impl, mesh)
    with phase(rank, "get_model_state_dict/get_optimizer_state_dict of the fresh model and optimizer"):
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "sched": sched.state_dict()}
    with phase(rank, "dcp.load"):
        dcp.load(sd, checkpoint_id=ckpt)
    with phase(rank, "set_model_state_dict"):
        set_model_state_dict(model, sd["model"])
    with phase(rank, "set_optimizer_state_dict"):
        set_optimizer_state_dict(model, opt, sd["optim"])
    with phase(rank, "scheduler.load_state_dict"):
        sched.load_state_dict(sd["sched"])
    with phase(rank, f"the resumed run, steps {K}..{N}"):
        train(model, opt, sched, engine, rank, K, N)
        result["resumed"] = snapshot(net, opt, sched)
    return result


# -- 2. ZeroRedundancyOptimizer: consolidate, save, resume ----------------------------------------------
def zero_resume_worker(rank: int, port: int, impl: str, out_dir: str) -> None:
    _run(rank, port, _zero_resume_runs, impl, out_dir)


def _zero_resume_runs(rank: int, impl: str, out_dir: str) -> Dict[str, Any]:
    """DDP + ZeroRedundancyOptimizer(optimizer_class=impl): never saved; uninterrupted, with
    consolidate_state_dict(to=0) and rank 0's state_dict() torch.saved (with the model and the
    scheduler) after K steps; resumed: fresh DDP + ZeRO, every rank loads the consolidated dict,
    the same M steps."""
    path = os.path.join(out_dir, "zero_checkpoint.pt")
    result: Dict[str, Any] = {}
    with phase(rank, f"the never-saved run ({N} steps)"):
        net, model, opt, sched = build("zero", impl)
        train(model, opt, sched, "zero", rank, 0, N)
        result["never_saved"] = snapshot(net, opt, sched)

    net, model, opt, sched = build("zero", impl)
    with phase(rank, f"the uninterrupted run, steps 0..{K}"):
        train(model, opt, sched, "zero", rank, 0, K)
    with phase(rank, "consolidate_state_dict(to=0)"):
        opt.consolidate_state_dict(to=0)
    if rank == 0:
        with phase(rank, "state_dict() on rank 0 and torch.save"):
            torch.save({"model": net.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}, path)
    dist.barrier()
    with phase(rank, f"the uninterrupted run, steps {K}..{N} after the save"):
        train(model, opt, sched, "zero", rank, K, N)
        result["uninterrupted"] = snapshot(net, opt, sched)

    net, model, opt, sched = build("zero", impl)
    with phase(rank, "torch.load of the consolidated checkpoint"):
        ck = torch.load(path)
    with phase(rank, "model.load_state_dict"):
        net.load_state_dict(ck["model"])
    with phase(rank, "ZeroRedundancyOptimizer.load_state_dict of the consolidated dict"):
        opt.load_state_dict(ck["optim"])
    with phase(rank, "scheduler.load_state_dict"):
        sched.load_state_dict(ck["sched"])
    with phase(rank, f"the resumed run, steps {K}..{N}"):
        train(model, opt, sched, "zero", rank, K, N)
        result["resumed"] = snapshot(net, opt, sched)
    return result


# -- 3. ZeroRedundancyOptimizer(parameters_as_bucket_view=True) -------------------------------------------
def zero_bucket_view_worker(rank: int, port: int, impl: str, out_dir: str) -> None:
    _run(rank, port, _zero_bucket_view_runs, impl, out_dir)


def _zero_bucket_view_runs(rank: int, impl: str, out_dir: str) -> Dict[str, Any]:
    """N steps of DDP + ZeRO(optimizer_class=impl) with parameters_as_bucket_view=False, then the
    same with True (each from fresh objects). A construction that refuses bucket views is recorded
    as result["refused"] (the error's text) instead of a run."""
    result: Dict[str, Any] = {}
    with phase(rank, f"parameters_as_bucket_view=False ({N} steps)"):
        net, model, opt, sched = build("zero", impl, bucket_view=False)
        train(model, opt, sched, "zero", rank, 0, N)
        result["flat"] = snapshot(net, opt, sched)
    with phase(rank, f"parameters_as_bucket_view=True ({N} steps)"):
        try:
            net, model, opt, sched = build("zero", impl, bucket_view=True)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
            result["refused"] = f"{type(exc).__name__}: {exc}"
        else:
            train(model, opt, sched, "zero", rank, 0, N)
            result["bucket_view"] = snapshot(net, opt, sched)
    return result
