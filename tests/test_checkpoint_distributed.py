"""Resuming from distributed checkpoints, bit for bit: 2 processes on 127.0.0.1 with the gloo backend.

Each case runs, inside one torch.multiprocessing.spawn (tests/_dist_ckpt_worker.py does the work),
a run that is never checkpointed, an uninterrupted run that saves a checkpoint after K steps and
trains M more, and a resumed run (fresh model, optimizer and LR scheduler built the same way, the
checkpoint loaded, the same M steps). On every rank the resumed run must equal the uninterrupted
one bit for bit (torch.equal): parameters, the optimizer's state, param_groups and the scheduler's
state; the uninterrupted run must equal the never-saved one (saving changes nothing).

1. torch.distributed.checkpoint: get_state_dict / get_model_state_dict / get_optimizer_state_dict,
   dcp.save, dcp.load into the fresh objects' state dicts, set_model_state_dict /
   set_optimizer_state_dict; with (a) a plain replicated model in each process, (b) DDP, (c) FSDP2
   (fully_shard on a CPU mesh; uneven and empty local shards).
2. ZeroRedundancyOptimizer(optimizer_class=...) over DDP: consolidate_state_dict(to=0), rank 0's
   state_dict() torch.saved; every rank of the resumed run loads that consolidated dict.
3. ZeroRedundancyOptimizer(parameters_as_bucket_view=True) gives, on every rank, the results of
   parameters_as_bucket_view=False.

The optimizer state these need (docs/SPEC.md, after the state rewrite): `opt.state` is keyed by
parameters only, and each updated parameter's entry holds "step" (the optimizer-wide t, a 0-dim
float32 tensor) and "momentum_buffer" or "m". A key that is not a parameter (the committed code's
`state["step"]`) makes get_optimizer_state_dict raise KeyError: 'step', and ZeRO's consolidation
drops it (t restarts at 0). DCP calls `load_state_dict(state_dict=...)` by keyword, and ZeRO's
load_state_dict assigns `optim.state[p]` directly (the local optimizer's load_state_dict never
runs): t must come back from the parameters' "step" entries.

Implementations: the fused tvlars_fused.TVLARS with every CPU backend available ("torch", and
"cpu" when the C++ extension is built; not "cpu" under FSDP2, which that backend refuses, see
tests/test_distributed.py), and the eager tvlars_fused.reference.TVLARS; the same for LAMB (ids
`fused-torch-LAMB`, `fused-cpu-LAMB`, `reference-LAMB`: its state entries hold "step", "exp_avg"
and "exp_avg_sq"). Two groups: default options, and the class's other form (TVLARS
momentum_form="paper", LAMB weight_decay_mode="decoupled" with bias_correction="step_size") with
both filters and its own lr; a StepLR scheduler whose period straddles the checkpoint.

Control: with TVLARS_CONTRACT_CONTROL=1 in the environment, every test also runs with
torch.optim.SGD(momentum=0.9) (implementation id "sgd"), which must pass all of them: it shows
that each test checks the optimizer, not a quirk of torch's checkpointing or of the harness.

    TVLARS_CONTRACT_CONTROL=1 python -m pytest -q tests/test_checkpoint_distributed.py -k sgd
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tvlars_fused.kernels import available_backends

import _dist_ckpt_worker as w
from backend_cases import ALGORITHMS

CONTROL = os.environ.get("TVLARS_CONTRACT_CONTROL") == "1"
BACKENDS = available_backends("cpu", ("torch", "cpu"))
IMPLS = ([f"fused-{b}" for b in BACKENDS] + ["reference"] + [f"fused-{b}-LAMB" for b in BACKENDS] + ["reference-LAMB"]
         + (["sgd"] if CONTROL else []))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The workers start from a forkserver that has imported torch, its distributed packages, dynamo
# (which the first optimizer step imports) and the worker module once: each case then takes about
# 1 s instead of 4 on this machine. A forked worker also leaves through os._exit, so no gloo thread
# can abort the interpreter's shutdown.
PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict",
           "torch.distributed.fsdp", "torch.distributed.optim", "torch.distributed.tensor", "torch._dynamo",
           "_dist_ckpt_worker"]


def _spawn(worker, *args, out_dir) -> list:
    """Run worker(rank, port, *args, out_dir) on WORLD ranks; return each rank's result. A worker's
    exception fails the test with the worker's traceback (which names the rank and the phase)."""
    mp.set_forkserver_preload(PRELOAD)   # (takes effect if this session's forkserver is not running yet)
    error = None
    try:
        mp.start_processes(worker, args=(_free_port(), *args, str(out_dir)), nprocs=w.WORLD, join=True,
                           start_method="forkserver")
    except mp.ProcessRaisedException as exc:
        error = str(exc)
    if error is not None:   # (outside the except: the traceback once, not chained twice)
        pytest.fail(error, pytrace=False)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(w.WORLD)]


def _assert_same(expected, got, what: str) -> None:
    problems = w.diff(expected, got)
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        pytest.fail(f"{what}: {len(problems)} difference(s)\n  {shown}{more}", pytrace=False)


def _state_keys(impl: str) -> set:
    """The keys a state entry of the implementation may hold (in either group: a rank may hold
    entries of one group only)."""
    if impl == "sgd":
        return {"momentum_buffer"}
    spec = ALGORITHMS[w.optimizer_spec(impl)[0].__name__]
    return {"step", *spec.state_keys(), *spec.state_keys(w.SECOND_GROUP[spec.name])}


def _assert_resumed(results, engine: str, impl: str) -> None:
    for r, res in enumerate(results):
        assert w.all_finite(res["uninterrupted"]), f"rank {r}: the {engine} run diverged (non-finite parameters)"
        keys = {k for entry in res["uninterrupted"]["state"].values() if isinstance(entry, dict) for k in entry}
        assert keys and keys <= _state_keys(impl), f"rank {r}: state keys {sorted(keys)} are not {impl}'s"
        _assert_same(res["never_saved"], res["uninterrupted"],
                     f"rank {r}, {engine}: saving the checkpoint changed the run that goes on after it")
        _assert_same(res["uninterrupted"], res["resumed"],
                     f"rank {r}, {engine}: the resumed run differs from the uninterrupted one")


# -- 1. torch.distributed.checkpoint ----------------------------------------------------------------
DCP_CASES = [(engine, impl) for engine in ("plain", "ddp", "fsdp2") for impl in IMPLS
             if not (engine == "fsdp2" and impl.startswith("fused-cpu"))]


@pytest.mark.parametrize("engine,impl", DCP_CASES)
def test_dcp_resume_is_bit_identical(engine, impl, tmp_path):
    results = _spawn(w.dcp_worker, engine, impl, out_dir=tmp_path)
    if engine == "fsdp2":
        numels = [res["local_numels"] for res in results]
        assert numels[1]["head.weight"] == 0 and numels[1]["head.bias"] == 0, "rank 1 must hold an empty shard"
        assert numels[0]["fc1.weight"] != numels[1]["fc1.weight"], "and an uneven one"
    _assert_resumed(results, engine, impl)


# -- 2. ZeroRedundancyOptimizer: consolidated state_dict -------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_consolidated_resume_is_bit_identical(impl, tmp_path):
    results = _spawn(w.zero_resume_worker, impl, out_dir=tmp_path)
    _assert_resumed(results, "ZeroRedundancyOptimizer", impl)
    # ZeRO spreads the state over the ranks: each rank must have held (and resumed) some of it.
    for r, res in enumerate(results):
        assert res["uninterrupted"]["state"], f"rank {r} owns no optimizer state: the test would not cover it"


# -- 3. ZeroRedundancyOptimizer(parameters_as_bucket_view=True) -----------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_bucket_view_matches_flat(impl, tmp_path):
    results = _spawn(w.zero_bucket_view_worker, impl, out_dir=tmp_path)
    flat = [res["flat"] for res in results]
    assert w.all_finite(flat[0]), "the parameters_as_bucket_view=False run diverged"
    _assert_same(flat[0]["params"], flat[1]["params"],
                 "parameters_as_bucket_view=False: the ranks' parameters differ (the test's setup is wrong)")
    for r, res in enumerate(results):
        if "refused" in res:
            pytest.fail(f"rank {r}: ZeroRedundancyOptimizer(parameters_as_bucket_view=True) was refused: "
                        f"{res['refused']}", pytrace=False)
        _assert_same(res["flat"], res["bucket_view"],
                     f"rank {r}: parameters_as_bucket_view=True differs from parameters_as_bucket_view=False")
