"""python -m bench: time TVLARS/LARS and LAMB optimizer steps (fused backends, eager reference, a
foreach step, torch.compile, and torch's SGD / AdamW as the floors) on real parameter shapes.

    python -m bench                 quick subset (a few minutes on a 2-core CPU): ResNet-50 and 2000
                                    tiny tensors in float32, ResNet-50 in bfloat16, TVLARS's
                                    torch.compile once, and step() host overhead (161 / 2000 tensors
                                    of 16 elements: fused against torch's fused and foreach SGD /
                                    AdamW); TVLARS and LAMB rows
    python -m bench --full          every set x float32/bfloat16 x every implementation, and the
                                    host-overhead rows
    python -m bench --sets resnet18,big64m --dtypes bfloat16 --impls eager,fused-cpu --steps 20
    python -m bench --algorithms lamb  only the LAMB rows (lamb-*, and AdamW as their floor)

LAMB rows (names lamb-*, implementations.py) run one configuration (pytorch-optimizer's default
Lamb as tvlars_fused options, implementations.LAMB_OPTIONS), beside TVLARS's in the same runs,
with their own eager reference ("x eager" against lamb-eager), floor (28 B per float32 parameter:
read w, g, m, v, write w, m, v; 22 B for bfloat16 with float32 moments) and foreach floor (torch's
AdamW foreach in the "/sgd-foreach" column). Their check: exp_avg, exp_avg_sq and the parameter
update after the first step against the float64 spec. The fused LAMB step moves 40 B per float32
parameter (32 B bfloat16): pass 1 reads w, g, m, v and writes m, v, pass 2 reads w, m, v and writes
w (docs/DESIGN.md); torch's fused AdamW reads w, g, m, v and writes w, m, v once (its state in the
parameter dtype).

Per (parameter set, dtype) all implementations are built over identical copies of the same weights
and gradients, checked against the spec in float64 after their first step, warmed up, and then
timed in interleaved rounds (each round runs a block of steps of every implementation, plus a
big-tensor copy_ that gives the copy bandwidth under the same conditions), so that a machine shared
with other jobs slows them all alike and the ratios stay meaningful. Reported: the median step time,
speed-ups, effective bandwidth at the floor (20 B per float32 parameter: read w, g, state, write w,
state; 14 B for bfloat16 with float32 state; LAMB's own floor for its rows), the bytes each design
moves, and ops per step (CPU: dispatcher ops from torch.profiler) or kernel launches and host syncs
per step (GPU).

Output: a table on stdout, progress on stderr, and bench/results/<device>[-quick|-custom].csv/.png/.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
DTYPES = ("float32", "bfloat16")
HOST_SETS = ("host161", "host2000")   # step() host overhead (tensors too small to matter)

T0 = time.perf_counter()
# the first step's momentum against the float64 spec, worst tensor: ok below CHECK_OK, warn below
# CHECK_FAIL (float32 accumulation over many elements), fail above
CHECK_OK, CHECK_FAIL = 1e-4, 1e-2


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="all sets x float32/bfloat16 x all implementations, torch.compile for each")
    from bench.shapes import SETS   # (no torch import: the help stays fast)
    ap.add_argument("--sets", help=f"comma-separated parameter sets ({', '.join(SETS)})")
    ap.add_argument("--impls", help="comma-separated implementations (eager, foreach, compiled, fused-cpu, "
                    "fused-cpu-grad, fused-torch, fused-triton, fused-triton-grad, fused-triton-graph, "
                    "fused-cuda, sgd-foreach, sgd-fused; -grad: denominator='grad'; LAMB: lamb-eager, "
                    "lamb-foreach, lamb-compiled, lamb-fused-cpu, lamb-fused-torch, lamb-fused-triton, "
                    "lamb-fused-triton-graph, lamb-fused-cuda, lamb-pytorch-optimizer, adamw-foreach, adamw-fused)")
    ap.add_argument("--algorithms", help="comma-separated: tvlars (TVLARS rows and the SGD floors), lamb (LAMB "
                    "rows and the AdamW floors); default both")
    ap.add_argument("--dtypes", help="comma-separated: float32, bfloat16")
    ap.add_argument("--steps", type=int, help="timed steps per implementation (default: adapt to the "
                    "step time within --time seconds per configuration)")
    ap.add_argument("--time", type=float, help="seconds of timing per configuration "
                    "(default 6, --full 15); the minimum step count may exceed it")
    ap.add_argument("--min-steps", type=int, help="least timed steps per implementation (default 5, --full 10)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the (checked) first step")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    ap.add_argument("--out", help="output name under the results directory (default: by device and mode)")
    ap.add_argument("--results-dir", default=RESULTS_DIR,
                    help="where the csv/md/png go (default bench/results); the csv is rewritten after every "
                         "configuration, so a run cut short keeps what it measured")
    ap.add_argument("--cold-compile", action="store_true",
                    help="compile with a fresh Inductor cache (default with --full, so compile times are cold)")
    ap.add_argument("--warm-compile", action="store_true",
                    help="use torch's persistent Inductor cache even with --full")
    ap.add_argument("--compile-max-tensors", type=int, default=500,
                    help="skip torch.compile for sets with more tensors (default 500; 0: no limit): "
                    "Inductor's compile time grows with the tensor count (ResNet-18's 62 tensors take ~1-2 "
                    "min on a 2-core CPU; the 2000-tiny-tensor graph did not finish in 8 min)")
    ap.add_argument("--no-check", action="store_true", help="skip the check of the first step against the float64 spec")
    ap.add_argument("--no-profile", action="store_true", help="skip the ops/launches/syncs count")
    ap.add_argument("--no-chart", action="store_true")
    return ap.parse_args(argv)


def _split(s: Optional[str]) -> Optional[List[str]]:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def plan(args, all_sets: Sequence[str], all_impls: Sequence[str]) -> Tuple[str, List[Tuple[str, str, List[str]]]]:
    """(mode, [(set, dtype, impls)])."""
    sets, impls, dtypes = _split(args.sets), _split(args.impls), _split(args.dtypes)
    algos = _split(getattr(args, "algorithms", None))
    for s in sets or ():
        if s not in all_sets:
            raise SystemExit(f"unknown set {s!r}; choose from {', '.join(all_sets)}")
    for d in dtypes or ():
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    from bench.implementations import ALL, FAMILIES, is_compiled
    for i in impls or ():
        if i not in ALL:
            raise SystemExit(f"unknown implementation {i!r}; choose from {', '.join(ALL)}")
    for a in algos or ():
        if a not in FAMILIES:
            raise SystemExit(f"unknown algorithm {a!r}; choose from {', '.join(FAMILIES)}")
    if algos:
        all_impls = [i for i in all_impls if any(i in FAMILIES[a] for a in algos)]
    # step() host overhead: tensors too small to matter, the fused steps against torch's fused
    # SGD / AdamW
    host = [i for i in all_impls if i.startswith(("fused-", "lamb-fused-")) and i not in ("fused-torch", "lamb-fused-torch")
            or i in ("sgd-fused", "sgd-foreach", "adamw-fused", "adamw-foreach")]
    host_configs = [(s, "float32", host) for s in HOST_SETS]
    if args.full:
        sets, dtypes = sets or [s for s in all_sets if s not in HOST_SETS], dtypes or list(DTYPES)
        impls = [i for i in all_impls if i in (impls or all_impls)]
        return "full", [(s, d, impls) for s in sets for d in dtypes] + (host_configs if args.sets is None else [])
    if sets is None and impls is None and dtypes is None:
        # torch.compile once (it takes ~1-2 min on a 2-core CPU); the slow portable fused-torch path
        # only where it is cheap (tiny tensors)
        # (TVLARS's only: lamb-compiled runs with --full or --impls)
        no_compile = [i for i in all_impls if not is_compiled(i)]
        big = [i for i in all_impls if i not in ("fused-torch", "lamb-fused-torch", "lamb-compiled")]
        return "quick", [("resnet50", "float32", big),
                         ("tiny2000", "float32", no_compile),
                         ("resnet50", "bfloat16", [i for i in big if not is_compiled(i)])] + host_configs
    sets, dtypes = sets or ["resnet50", "tiny2000"], dtypes or ["float32"]
    impls = [i for i in all_impls if i in (impls or all_impls)]
    return "custom", [(s, d, impls) for s in sets for d in dtypes]


# ---------------------------------------------------------------------------------------------
# machine description
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(s: str) -> str:
    s = re.sub(r"\((r|tm)\)|cpu @.*|processor|\d+-core|with radeon.*", "", s.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:40] or "unknown"


def git_commit() -> str:
    """The checkout's commit; without git (a copy of the tree on a lent GPU machine), the one written
    to .ci/commit before the tree was sent (see .ci/gpu)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if rev:
            return rev + ("+dirty" if dirty else "")
    except Exception:
        pass
    try:
        with open(os.path.join(HERE, os.pardir, ".ci", "commit")) as f:
            return f.read().strip() + " (from .ci/commit)"
    except OSError:
        return "unknown"


def extension_build() -> str:
    """Which tvlars_fused._C the run loaded (file and mtime): it is rebuilt outside git."""
    try:
        import tvlars_fused._C as ext
        st = os.stat(ext.__file__)
        when = datetime.datetime.fromtimestamp(st.st_mtime).astimezone().isoformat(timespec="seconds")
        return f"{os.path.basename(ext.__file__)} built {when}"
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
class Timer:
    """Times single steps: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def run(self, fn, n: int) -> List[float]:
        if not self.cuda:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return out
        torch = self.torch
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        ev[0].record()
        for i in range(n):
            fn()
            ev[i + 1].record()
        torch.cuda.synchronize()
        return [ev[i].elapsed_time(ev[i + 1]) / 1e3 for i in range(n)]


class Copy:
    """The bandwidth yardstick: dst.copy_(src) of a big float32 tensor (2 x nbytes moved)."""
    name = "copy"

    def __init__(self, torch, device, numel: int):
        self.src = torch.ones(numel, dtype=torch.float32, device=device)
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * self.src.numel() * 4

    def step(self):
        self.dst.copy_(self.src)


class Axpy:
    """The read-modify-write yardstick: a.add_(b, alpha) (read a, b; write a: 3 x nbytes), the
    access pattern of an optimizer step (no write-allocate traffic that copy_ pays for dst)."""
    name = "axpy"

    def __init__(self, torch, device, numel: int):
        self.a = torch.zeros(numel, dtype=torch.float32, device=device)
        self.b = torch.ones_like(self.a)
        self.bytes = 3 * self.a.numel() * 4

    def step(self):
        self.a.add_(self.b, alpha=1e-6)


def copy_bandwidth(torch, device, timer, numel: int, reps: int = 10) -> float:
    c = Copy(torch, device, numel)
    timer.run(c.step, 3)
    t = statistics.median(timer.run(c.step, reps))
    return c.bytes / t / 1e9


def interleaved(runners: Dict[str, object], timer: Timer, est: Dict[str, float], budget_s: float,
                min_steps: int, fixed_steps: Optional[int], progress) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Time every runner in rounds (a block of steps each per round) until each has enough steps
    (or exactly fixed_steps) and the budget is spent. Block sizes and step counts follow each
    runner's running median step time (the warm-up estimate `est` only seeds them), so one slow
    warm-up step on a busy machine does not leave a fast runner with few samples."""
    names = list(runners)
    est = dict(est)
    times: Dict[str, List[float]] = {n: [] for n in names}
    errors: Dict[str, str] = {}
    start = time.perf_counter()
    rounds = 0
    while True:
        rounds += 1
        # each round gives every runner a block of about block_s (at least one step): fast
        # runners get several steps while the slowest runs one
        block_s = max(budget_s / (8 * max(len(names), 1)), 0.3 * max(est[n] for n in names), 0.02)
        block_s = min(block_s, max(budget_s / 4, 0.02))
        # min_steps each, but a runner slower than budget_s / min_steps needs only enough steps
        # to fill the budget (at least 3): one 30 s step of a slow path averages the load itself
        need = {n: min(min_steps, max(3, math.ceil(budget_s / max(est[n], 1e-6)))) for n in names}
        for n in list(names):
            k = max(1, min(int(block_s / max(est[n], 1e-6)), 1000))
            if fixed_steps is not None:
                k = min(k, fixed_steps - len(times[n]))
                if k <= 0:
                    continue
            elif len(times[n]) >= need[n] and est[n] > 2 * block_s:
                continue   # a slow runner with enough samples: let the others catch up
            try:
                times[n] += timer.run(runners[n].step, k)
                est[n] = statistics.median(times[n])
            except Exception as exc:   # drop it, keep the others
                errors[n] = f"error while timing: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                progress(f"{n} failed: {errors[n]}")
                names.remove(n)
                del times[n]
        elapsed = time.perf_counter() - start
        progress(f"round {rounds}, {elapsed:.1f}s: " + ", ".join(f"{n} {len(times[n])}" for n in names))
        if fixed_steps is not None:
            if all(len(times[n]) >= fixed_steps for n in names):
                break
        elif all(len(times[n]) >= need[n] for n in names) and elapsed >= budget_s:
            break
    return times, errors


def count_ops(torch, impl, steps: int) -> float:
    """Dispatcher ops per step as a TorchDispatchMode sees them: the outermost ops the step calls
    (an op's own internal calls are not counted; a fused extension op counts once)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not str(func).startswith("profiler."):   # torch.optim's record_function markers
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        for _ in range(steps):
            impl.step()
    return Count.n / steps


# torch.cuda.set_sync_debug_mode("warn")'s warning for every synchronizing CUDA operation torch
# performs (c10/cuda/CUDAFunctions.cpp: item(), a blocking copy, stream synchronize, nonzero, ...)
SYNC_WARNING = "called a synchronizing"
_WARMED_UP: set = set()   # (device type, index) whose counters warm_up_counters has run


def count_syncs(torch, step, steps: int) -> Tuple[float, List[str]]:
    """Host syncs per step as torch.cuda.set_sync_debug_mode("warn") reports them, and where they
    came from (the Python file:line that called the synchronizing operation, as the warning names
    it). Only that warning counts: any other warning the step raises is not a sync."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(1)
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    syncs = [w for w in caught if SYNC_WARNING in str(w.message).lower()]

    def short(path: str) -> str:   # the repo's files relative to it, an installed package's from it
        rel = os.path.relpath(path, os.path.join(HERE, os.pardir))
        return rel if not rel.startswith(os.pardir) else path.split("site-packages" + os.sep)[-1]

    where = {f"{short(w.filename)}:{w.lineno}": None for w in syncs}
    return len(syncs) / steps, list(where)


def warm_up_counters(torch, device) -> None:
    """Once per process, before the first real count: run the whole count (dispatcher ops, host
    syncs, the profiler) over a trivial step (x.add_(1): one launch, no sync) and throw it away.
    A GPU run counted one host sync for whichever implementation was profiled first in a process
    (eager 3808/1 in the first configuration and 0 after; fused-triton 2/1 only when it came
    first): a one-off of the process's first profiler session / first sync-debug window, not the
    step's. Warming up on a step that has no sync takes it out of every row; the log shows what
    the trivial step got (and from where), so a recurrence is visible. A real sync is a warning in
    every step's window, and is still counted."""
    key = (device.type, getattr(device, "index", None))
    if key in _WARMED_UP:
        return
    _WARMED_UP.add(key)
    x = torch.zeros(16, device=device)

    class Trivial:
        @staticmethod
        def step():
            x.add_(1)

    got = profile_counts(torch, Trivial, device, 1, ops_from_profiler=False)
    log("counters warmed up on a trivial step (x.add_(1)), discarded: "
        f"{got.get('launches_per_step', 0):.0f} launches, {got.get('syncs_per_step', 0):.0f} host syncs"
        + (f" (from {got['syncs_at']})" if got.get("syncs_at") else ""))


def profile_counts(torch, impl, device, steps: int, ops_from_profiler: bool) -> Dict[str, object]:
    """ops_per_step: outermost dispatcher ops per step (TorchDispatchMode; from torch.profiler
    for compiled code, which a dispatch mode would make Dynamo recompile). On a GPU also
    syncs_per_step (count_syncs; syncs_at: where they came from) and launches_per_step
    (device-side kernel, memcpy and memset events in torch.profiler). The sync window runs before
    the profiler session, never right after one, and the first count in a process is preceded by
    warm_up_counters."""
    cuda = device.type == "cuda"
    if cuda:
        warm_up_counters(torch, device)
    out: Dict[str, object] = {}
    if not ops_from_profiler:
        out["ops_per_step"] = count_ops(torch, impl, steps)
    if cuda:
        out["syncs_per_step"], where = count_syncs(torch, impl.step, steps)
        if where:
            out["syncs_at"] = ", ".join(where)
    if ops_from_profiler or cuda:
        from torch.profiler import ProfilerActivity, profile, record_function
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                with record_function("bench_step"):
                    impl.step()
            if cuda:
                torch.cuda.synchronize()
        top = launches = 0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                # record_function ranges (ours, torch.optim's) are mirrored on the GPU timeline
                if not getattr(e, "is_user_annotation", False) and e.name != "bench_step" \
                        and not e.name.startswith("Optimizer."):
                    launches += 1
                continue
            if not ops_from_profiler or "::" not in e.name:
                continue
            p, inside, outermost = e.cpu_parent, False, True   # inside bench_step, no op above it
            while p is not None:
                if p.name == "bench_step":
                    inside = True
                    break
                if "::" in p.name:
                    outermost = False
                p = p.cpu_parent
            top += inside and outermost
        if ops_from_profiler:
            out["ops_per_step"] = top / steps
        if cuda:
            out["launches_per_step"] = launches / steps
    return out


# ---------------------------------------------------------------------------------------------
# one configuration
# ---------------------------------------------------------------------------------------------
def run_config(torch, I, shapes, set_name: str, dtype_name: str, names: List[str], device, args,
               timer: Timer, copy_numel: int, budget_s: float, min_steps: int, counter: str) -> List[dict]:
    from tvlars_fused.schedule import phi

    dtype = getattr(torch, dtype_name)
    shape_list = shapes.SETS[set_name]
    n_tensors, n_params = shapes.count(set_name)
    tag = f"{counter} {set_name}/{dtype_name}"
    log(f"{tag}: {n_tensors} tensors, {n_params:,} params; making weights and gradients")

    gen = torch.Generator().manual_seed(1234)
    master_w = torch.randn(n_params, generator=gen).mul_(0.05).to(device=device, dtype=dtype)
    master_g = torch.randn(n_params, generator=gen).mul_(0.01).to(device=device, dtype=dtype)
    offsets = [0]
    for s in shape_list:
        offsets.append(offsets[-1] + shapes.numel(s))
    grads = [master_g[o:o + shapes.numel(s)].view(s) for o, s in zip(offsets, shape_list)]

    def fresh_params():
        ps = []
        for o, s, g in zip(offsets, shape_list, grads):
            p = torch.nn.Parameter(master_w[o:o + shapes.numel(s)].view(s).clone())
            p.grad = g   # shared, read-only for every implementation (the fused ones take it into their buckets)
            ps.append(p)
        return ps

    rows: Dict[str, dict] = {}
    impls: Dict[str, object] = {}
    est: Dict[str, float] = {}
    truths: Dict[str, List] = {}   # per denominator: float64 momentum after step 1, stored as float32
    lamb_truth: Dict[str, List] = {}   # exp_avg, exp_avg_sq, update (w1 - w0) after step 1, as float32

    def rel_err(got, want) -> float:
        den = float(want.double().square().sum().sqrt())
        num = float((got.detach().double() - want.double()).square().sum().sqrt())
        return num / den if den > 0 else num

    def check_lamb(impl) -> Tuple[float, str]:
        """Largest per-tensor relative error, after the first step, of exp_avg, exp_avg_sq and the
        parameter update w1 - w0 against the spec evaluated in float64 from the same weights and
        gradients, for the benchmark's LAMB configuration (step 1: m = (1-b1) g, v = (1-b2) g^2,
        u = m / (sqrt(v) + eps), w1 = w0 (1 - lr wd) - lr / (1-b1) q u).

        bfloat16 parameters: the new weight is stored in bfloat16, so an implementation that computes
        it in float32, exactly as the spec, still lands one ulp away from the float64 spec rounded to
        bfloat16 wherever its value lies within its float32 error of a rounding tie: LAMB's first
        update is about one ulp of the weight for the large tensors (the clip at 10), so those flips,
        from float32 norms that are off by ~1e-4 (torch's CPU norm over millions of elements), count
        for ~1% of the update (resnet18: eager 1.3e-2, fused cpu 5e-3). The update is therefore
        checked at the parameter dtype's resolution: per element only the error beyond one ulp (at
        the spec's unrounded value) counts, relative to ||w1 - w0|| before rounding; that catches a
        wrong trust ratio, clip or bias correction wherever the update spans a few ulps (the small
        weights of every tensor), not a rounding-mode error (the float32 row checks the arithmetic
        and tests/ the bits). The moments are float32 and checked strictly, except where an
        implementation keeps them and its arithmetic in the parameter dtype
        (impl.state_in_param_dtype: pytorch-optimizer's Lamb): the moments at that dtype's
        resolution, and its update may also be two epsilons of the dtype off relative to itself.
        The strict figures are in the detail (the log, and the row's note).

        float32 is checked strictly: an implementation whose norms are float32 sums (torch's CPU
        linalg.vector_norm / _foreach_norm: eager, foreach, pytorch-optimizer) carries their error
        into q and the update; ||u|| of a 2.4M-element ResNet-50 conv, whose |u| are all close to
        (1-b1)/sqrt(1-b2) at step 1, comes out 4.6e-4 off on a CPU (the sum of squares in float32:
        7e-8), which the check shows ("warn"), with the moments' and the update's errors apart in
        the detail."""
        low = dtype in (torch.bfloat16, torch.float16)
        if not lamb_truth:
            hp, opt = I.LAMB_HP, I.LAMB_OPTIONS
            assert (opt["bias_correction"], opt["weight_decay_mode"]) == ("first_moment", "decoupled"), \
                "the float64 check below is written for LAMB_OPTIONS' bias correction and decay mode"
            b1, b2 = hp["betas"]
            lr, wd, eps = hp["lr"], hp["weight_decay"], hp["eps"]
            for k in ("exp_avg", "exp_avg_sq", "update", "update_exact"):
                lamb_truth[k] = []
            for o, s, g in zip(offsets, shape_list, grads):
                w64 = master_w[o:o + shapes.numel(s)].view(s).double()
                g64 = g.double()
                m = (1 - b1) * g64
                v = (1 - b2) * (g64 * g64)
                u = m / (v.sqrt() + eps)
                wp = w64 * (1 - lr * wd)
                wn = min(float(wp.square().sum().sqrt()), opt["weight_norm_clip"])
                un = float(u.square().sum().sqrt())
                q = wn / (un + opt["ratio_eps"]) if wn > 0 and un > 0 else 1.0
                w1 = wp - (lr / (1 - b1) * q) * u
                lamb_truth["exp_avg"].append(m.float())
                lamb_truth["exp_avg_sq"].append(v.float())
                lamb_truth["update"].append((w1.to(dtype).double() - w64).float())
                if low:
                    lamb_truth["update_exact"].append((w1 - w64).float())
        st = impl.check_state()
        w0s = [master_w[o:o + shapes.numel(s)].view(s).double() for o, s in zip(offsets, shape_list)]
        got = dict(exp_avg=list(st["exp_avg"]), exp_avg_sq=list(st["exp_avg_sq"]),
                   update=[p.detach().double() - w0 for p, w0 in zip(st["param"], w0s)])

        def worst(key):
            return max((rel_err(a, b) for a, b in zip(got[key], lamb_truth[key])), default=0.0)

        strict = {k: worst(k) for k in ("exp_avg", "exp_avg_sq", "update")}
        detail = ", ".join(f"{k} {v:.1e}" for k, v in strict.items())
        if not low:
            return max(strict.values()), detail
        ulp0 = torch.finfo(dtype).eps

        def beyond_one_ulp(a, exact, ref, norm_of, rel: float = 0.0) -> float:
            # elementwise |a - exact| beyond one ulp of the parameter dtype at ref (plus rel * |exact|),
            # over ||norm_of||
            e = ref.double().abs()
            ulp = torch.where(e > 0, ulp0 * torch.exp2(torch.floor(torch.log2(e))),
                              torch.full_like(e, torch.finfo(dtype).tiny * ulp0))
            excess = ((a.detach().double() - exact.double()).abs() - ulp - rel * exact.double().abs()).clamp_(min=0)
            den = float(norm_of.double().square().sum().sqrt())
            num = float(excess.square().sum().sqrt())
            return num / den if den > 0 else num

        res = dict(strict)
        # arithmetic in the parameter dtype (impl.state_in_param_dtype): the moments at that dtype's
        # resolution, and the update may also be two epsilons of the dtype off relative to itself:
        # ~7 roundings to the dtype (the two norms and their ratio; sqrt, +eps, reciprocal, *m of u),
        # which exceed one ulp of the weight where the update spans hundreds of its ulps (the
        # smallest weights: pytorch-optimizer's q for a 512-element ResNet-50 norm weight is 0.5%
        # off, its update 1.4%). A wrong bias correction or clip is off by far more.
        arith = 2 * ulp0 if impl.state_in_param_dtype else 0.0
        if impl.state_in_param_dtype:
            for k in ("exp_avg", "exp_avg_sq"):
                res[k] = max((beyond_one_ulp(a, t, t, t) for a, t in zip(got[k], lamb_truth[k])), default=0.0)
        res["update"] = max((beyond_one_ulp(a, t, t + w0, t, arith) for a, t, w0 in
                             zip(got["update"], lamb_truth["update_exact"], w0s)), default=0.0)
        what = (f"moments and update at {dtype_name} arithmetic's resolution (error beyond one ulp of the weight "
                "and two epsilons of the update)" if impl.state_in_param_dtype else
                f"update checked at {dtype_name} resolution (error beyond one ulp)")
        return max(res.values()), (f"{what}: " + ", ".join(f"{k} {v:.1e}" for k, v in res.items())
                                   + f"; strict: {detail}")

    def check(impl) -> Tuple[float, str]:
        """Largest per-tensor relative error of the momentum after the first step against the
        spec evaluated in float64 from the same weights and gradients (step 1: buf = q * d).
        LAMB rows: check_lamb."""
        if impl.algorithm == "lamb":
            return check_lamb(impl)
        denominator = getattr(impl, "denominator", "update")
        if denominator not in truths:
            truth = truths[denominator] = []
            hp = I.HP
            ph = phi(0.0, hp["lmbda"], hp["delay_steps"], hp["alpha"], hp["gamma_min"])
            for o, s, g in zip(offsets, shape_list, grads):
                w64 = master_w[o:o + shapes.numel(s)].view(s).double()
                d64 = g.double() + hp["weight_decay"] * w64
                wn, dn, gn = (float(x.square().sum().sqrt()) for x in (w64, d64, g.double()))
                norm, den = (gn, gn + hp["weight_decay"] * wn) if denominator == "grad" else (dn, dn)
                q = hp["eta"] * ph * wn / den if wn > 0 and norm > 0 else 1.0
                truth.append((d64 * q).float())
        worst = 0.0
        for m, t in zip(impl.momentum(), truths[denominator]):
            worst = max(worst, rel_err(m, t))
        return worst, ""

    for name in names:
        row = dict(set=set_name, dtype=dtype_name, impl=name, tensors=n_tensors, params=n_params,
                   algorithm=I.algorithm_of(name))
        rows[name] = row
        if I.is_compiled(name) and 0 < args.compile_max_tensors < n_tensors:
            row["note"] = (f"skipped: {n_tensors} tensors > --compile-max-tensors {args.compile_max_tensors} "
                           "(Inductor compile time grows with the tensor count)")
            log(f"{tag}: {row['note']}")
            continue
        try:
            impl = I.make(name, device)
            log(f"{tag}: setting up {name}" + (" (compiling)" if I.is_compiled(name) else ""))
            if I.is_compiled(name):
                import torch._dynamo.utils as du
                hits0 = du.counters["inductor"]["fxgraph_cache_hit"]
            impl.setup(fresh_params())
            if I.is_compiled(name):
                hit = du.counters["inductor"]["fxgraph_cache_hit"] > hits0
                row["compile_s"] = impl.compile_s
                row["compile_cache"] = "warm" if hit else "cold"
                log(f"{tag}: compiled in {impl.compile_s:.1f}s ({row['compile_cache']} Inductor cache)")
            elif not getattr(impl, "stepped_in_setup", False):
                impl.step()      # the checked first step
        except I.Unavailable as exc:
            row["note"] = f"unavailable: {exc}"
            log(f"{tag}: skip {name}: {exc}")
            continue
        except Exception as exc:   # a backend under construction must not stop the whole run
            row["note"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(f"{tag}: {name} failed: {row['note']}")
            continue
        impl.label = getattr(impl, "label", name)
        row["label"] = impl.label
        if not args.no_check and impl.checked:
            rel, detail = check(impl)
            row["check_rel_err"] = rel
            what = "momentum" if impl.algorithm == "tvlars" else "state or update"
            if detail:
                log(f"{tag}: {name} check against the float64 spec (worst tensor, relative): {detail}")
            if impl.algorithm == "lamb" and rel < CHECK_FAIL and (dtype != torch.float32 or not rel < CHECK_OK):
                row["note"] = (row.get("note", "") + f" check: {detail}").strip()
            if not rel < CHECK_FAIL:
                row["note"] = (row.get("note", "") + f" CHECK FAILED: {what} after step 1 differs from "
                               f"the float64 spec by {rel:.1e} (relative, worst tensor"
                               + (f"; {detail})" if detail else ")")).strip()
                log(f"{tag}: {name} CHECK FAILED (rel err {rel:.1e})")
        # warm-up, and a first estimate of the step time
        w = timer.run(impl.step, max(args.warmup, 1))
        est[name] = min(w)
        impls[name] = impl
    truths.clear()       # the float64 spec's results: not needed while timing
    lamb_truth.clear()

    yard = {"copy": Copy(torch, device, copy_numel), "axpy": Axpy(torch, device, copy_numel)}
    for k, y in yard.items():
        timer.run(y.step, 2)
        est[k] = min(timer.run(y.step, 2))
    runners = dict(impls)
    runners.update(yard)
    log(f"{tag}: timing {', '.join(impls)} + copy_ and axpy yardsticks in interleaved rounds")
    times, errors = interleaved(runners, timer, est, budget_s, min_steps, args.steps,
                                lambda msg: log(f"{tag}: {msg}"))
    for name, err in errors.items():
        rows[name]["note"] = (rows[name].get("note", "") + " " + err).strip()
        impls.pop(name, None)
    copy_gbs = yard["copy"].bytes / statistics.median(times.pop("copy")) / 1e9
    axpy_gbs = yard["axpy"].bytes / statistics.median(times.pop("axpy")) / 1e9
    del yard, runners

    for name, impl in impls.items():
        floor = impl.floor_bytes(dtype)
        ts = sorted(times[name])
        med = statistics.median(ts)
        row = rows[name]
        design, how = impl.design_bytes(dtype)
        row.update(
            steps=len(ts), median_ms=med * 1e3, p10_ms=ts[int(0.1 * (len(ts) - 1))] * 1e3,
            p90_ms=ts[int(math.ceil(0.9 * (len(ts) - 1)))] * 1e3, min_ms=ts[0] * 1e3,
            floor_bytes_per_param=floor, floor_gbs=floor * n_params / med / 1e9,
            copy_gbs=copy_gbs, pct_copy_bw=100 * floor * n_params / med / 1e9 / copy_gbs,
            axpy_gbs=axpy_gbs, pct_axpy_bw=100 * floor * n_params / med / 1e9 / axpy_gbs,
            design_bytes_per_param=design, design_how=how,
            design_gbs=design * n_params / med / 1e9,
        )
        if getattr(impl, "note", ""):
            row["note"] = (row.get("note", "") + " " + impl.note).strip()
    if not args.no_profile:
        for name, impl in impls.items():
            log(f"{tag}: profiling {name}")
            try:
                counts = profile_counts(torch, impl, device, 1, ops_from_profiler=I.is_compiled(name))
                if counts.get("syncs_at"):
                    rows[name]["note"] = (rows[name].get("note", "") + " host syncs from "
                                          + str(counts.pop("syncs_at"))).strip()
                rows[name].update(counts)
            except Exception as exc:  # profiling is a nice-to-have
                rows[name]["note"] = (rows[name].get("note", "") + f" profile failed: {exc}").strip()
    # per family: TVLARS/SGD rows against eager and sgd-foreach, LAMB/AdamW rows against
    # lamb-eager and adamw-foreach (the same columns)
    for row in rows.values():
        if "median_ms" in row:
            eager_name, floor_name = I.BASELINES[I.family(row["impl"])]
            base = rows.get(eager_name, {}).get("median_ms")
            sgd = rows.get(floor_name, {}).get("median_ms")
            if base:
                row["speedup_vs_eager"] = base / row["median_ms"]
            if sgd:
                row["time_vs_sgd_foreach"] = row["median_ms"] / sgd
    impls.clear()
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
COLUMNS = ["device", "device_name", "mode", "set", "dtype", "impl", "label", "tensors", "params", "steps",
           "median_ms", "p10_ms", "p90_ms", "min_ms", "speedup_vs_eager", "time_vs_sgd_foreach",
           "floor_bytes_per_param", "floor_gbs", "copy_gbs", "pct_copy_bw", "axpy_gbs", "pct_axpy_bw", "design_bytes_per_param",
           "design_gbs", "design_how", "ops_per_step", "launches_per_step",
           "syncs_per_step", "compile_s", "compile_cache", "check_rel_err", "note", "torch", "threads",
           "commit", "extension", "date", "loadavg_start", "loadavg_end", "algorithm"]


def fmt(v, spec):
    if v is None or v == "":
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def table_rows(results: List[dict], gpu: bool) -> Tuple[List[str], List[List[str]]]:
    head = ["set", "dtype", "impl", "ms/step", "p10-p90 ms", "steps", "x eager", "/sgd-foreach",
            "GB/s@floor", "%copy", "%axpy", "B/param", ("launch/syncs" if gpu else "ops/step"), "compile s", "check"]
    out = []
    for r in results:
        if "median_ms" not in r:
            out.append([r["set"], r["dtype"], r["impl"]] + ["-"] * 11 + [r.get("note", "")[:60]])
            continue
        if gpu:
            ops = f"{fmt(r.get('launches_per_step'), '.0f')}/{fmt(r.get('syncs_per_step'), '.0f')}"
        else:
            ops = fmt(r.get("ops_per_step"), ".0f")
        chk = r.get("check_rel_err")
        check = "-" if chk is None else (
            "ok" if chk < CHECK_OK else "warn" if chk < CHECK_FAIL else "FAIL") + f" {chk:.0e}"
        comp = fmt(r.get("compile_s"), ".0f")
        if r.get("compile_cache"):
            comp += f" ({r['compile_cache']})"
        out.append([r["set"], r["dtype"], r["impl"], fmt(r["median_ms"], ".3f"),
                    f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", str(r["steps"]),
                    fmt(r.get("speedup_vs_eager"), ".2f"), fmt(r.get("time_vs_sgd_foreach"), ".2f"),
                    fmt(r["floor_gbs"], ".1f"), fmt(r["pct_copy_bw"], ".0f"), fmt(r["pct_axpy_bw"], ".0f"),
                    fmt(r["design_bytes_per_param"], ".0f"), ops, comp, check])
    return head, out


def text_table(head, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    prev = None
    for r in rows:
        key = (r[0], r[1])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)


def md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: str, results: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)


def chart(path: str, results: List[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if "median_ms" in r]
    if not ok:
        return
    configs = list(dict.fromkeys((r["set"], r["dtype"]) for r in ok))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    by = {(r["set"], r["dtype"], r["impl"]): r for r in ok}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(configs) + 3), 8), sharex=True)
    width = 0.8 / len(impls)
    ncol = 10 if len(impls) <= 10 else 20   # tab20 once the TVLARS and LAMB rows share a chart
    cmap = plt.get_cmap(f"tab{ncol}")
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i, c in enumerate(configs) if (*c, impl) in by]
        rs = [by[(*c, impl)] for c in configs if (*c, impl) in by]
        axes[0].bar(xs, [r["median_ms"] for r in rs], width, label=impl, color=cmap(k % ncol))
        axes[1].bar(xs, [r["pct_copy_bw"] for r in rs], width, color=cmap(k % ncol))
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median ms / step (log)")
    axes[0].legend(ncol=min(len(impls), 5), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.08))
    axes[0].grid(axis="y", alpha=0.3, which="both")
    lamb = any(r["impl"].startswith(("lamb-", "adamw-")) for r in ok)
    axes[1].set_ylabel("% of copy bandwidth at the floor\n" + (
        "(B/param float32 / bfloat16: 20 / 14,\nLAMB and AdamW 28 / 22)" if lamb else "(20 B/param float32, 14 B bfloat16)"))
    axes[1].axhline(100, color="k", lw=0.8, ls="--")
    axes[1].grid(axis="y", alpha=0.3)
    labels = []
    for s, d in configs:
        n = next(r["params"] for r in ok if r["set"] == s)
        labels.append(f"{s}\n{d}\n{n / 1e6:.2f}M params")
    axes[1].set_xticks(range(len(configs)))
    axes[1].set_xticklabels(labels, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    cold = args.cold_compile or (args.full and not args.warm_compile)
    cache_dir = None
    if cold:   # before torch reads its Inductor config
        cache_dir = tempfile.mkdtemp(prefix="bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    log("importing torch")
    import torch

    from bench import implementations as I
    from bench import shapes

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    all_impls = I.names_for(device)
    mode, configs = plan(args, list(shapes.SETS), all_impls)
    families = _split(args.algorithms) or list(I.FAMILIES)   # valid: plan() checked them
    skipped = [n for n in I.ALL if n not in all_impls and any(n in I.FAMILIES[a] for a in families)]
    if gpu:
        dev_name = torch.cuda.get_device_name(device)
        dev_slug = "cuda-" + slug(dev_name)
    else:
        dev_name = f"{cpu_model()} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"
        dev_slug = "cpu-" + slug(cpu_model())
    out_name = args.out or (dev_slug + {"full": "", "quick": "-quick", "custom": "-custom"}[mode])
    os.makedirs(args.results_dir, exist_ok=True)
    base = os.path.join(args.results_dir, out_name)
    budget = args.time if args.time is not None else (15.0 if mode == "full" else 6.0)
    min_steps = args.min_steps or (10 if mode == "full" else 5)
    timer = Timer(torch, device)
    meta = dict(device=device.type, device_name=dev_name, mode=mode, torch=torch.__version__,
                threads=torch.get_num_threads(), commit=git_commit(), extension=extension_build(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                loadavg_start=loadavg())
    copy_numel = (256 if gpu else 64) * 2 ** 20
    log(f"{mode} run on {dev_name}, torch {torch.__version__}, commit {meta['commit']}, "
        f"load average {meta['loadavg_start']}; {len(configs)} configurations -> {base}.csv")
    copy_start = copy_bandwidth(torch, device, timer, copy_numel)
    log(f"copy bandwidth {copy_start:.1f} GB/s ({copy_numel * 4 >> 20} MiB copy_)")
    log(f"extension: tvlars_fused._C {meta['extension']}")

    results: List[dict] = []
    for k, (s, d, names) in enumerate(configs):
        rows = run_config(torch, I, shapes, s, d, names, device, args, timer, copy_numel, budget,
                          min_steps, f"[{k + 1}/{len(configs)}]")
        for r in rows:
            r.update(meta)
        results += rows
        write_csv(base + ".csv", results)
    meta["loadavg_end"] = loadavg()
    copy_end = copy_bandwidth(torch, device, timer, copy_numel)
    for r in results:
        r["loadavg_end"] = meta["loadavg_end"]
    write_csv(base + ".csv", results)

    head, rows = table_rows(results, gpu)
    lamb_rows = any(I.family(r["impl"]) == "lamb" for r in results)
    what = "TVLARS/LAMB" if lamb_rows else "TVLARS"
    hdr = (f"{what} step benchmark ({mode}) on {dev_name}; torch {torch.__version__}; commit {meta['commit']}; "
           f"{meta['date']}\nextension: tvlars_fused._C {meta['extension']}\ncopy_ bandwidth alone: {copy_start:.1f} GB/s at start, {copy_end:.1f} GB/s at end; "
           f"load average "
           f"{meta['loadavg_start']} -> {meta['loadavg_end']}\n"
           f"ms/step: median; x eager: speed-up over the eager reference; /sgd-foreach: time relative to "
           f"torch SGD foreach; GB/s@floor: {I.floor_bytes(torch.float32)} B (float32) / "
           f"{I.floor_bytes(torch.bfloat16)} B (bfloat16) per parameter over the step time; %copy / %axpy: "
           f"that as a share of copy_ (2 x bytes) / a += alpha*b (3 x bytes) bandwidth timed in the same "
           f"rounds; B/param: bytes the design moves; " + ("launch/syncs: kernel launches / host syncs per step" if gpu else
                                     "ops/step: outermost dispatcher ops per step (TorchDispatchMode; profiler for compiled)"))
    if lamb_rows:
        hdr += (f"\nLAMB rows (lamb-*, adamw-*): one configuration, pytorch-optimizer's default Lamb "
                f"({', '.join(f'{k}={v}' for k, v in {**I.LAMB_HP, **I.LAMB_OPTIONS}.items())}); "
                f"x eager: over lamb-eager; /sgd-foreach: relative to torch AdamW foreach; GB/s@floor: "
                f"{I.floor_bytes(torch.float32, 'lamb')} B (float32) / {I.floor_bytes(torch.bfloat16, 'lamb')} B "
                f"(bfloat16, float32 moments) per parameter (read w, g, m, v; write w, m, v); B/param of the "
                f"fused rows: {I.lamb_fused_bytes(torch.float32)[0]} B / {I.lamb_fused_bytes(torch.bfloat16)[0]} B "
                f"(pass 1 reads w, g, m, v, writes m, v; pass 2 reads w, m, v, writes w); check: exp_avg, "
                f"exp_avg_sq and w1 - w0 after step 1 against the float64 spec (bfloat16: w1 - w0 at bfloat16 "
                f"resolution, the error beyond one ulp)")
    if skipped:   # grouped by what they need: "fused-cpu, ... (CPU only)", "fused-triton, ... (need a CUDA device)"
        by_need: Dict[str, List[str]] = {}
        for n in skipped:
            by_need.setdefault(I.requirement(n) or f"not available on {device.type}", []).append(n)
        hdr += f"\nnot run on {device.type}: " + "; ".join(f"{', '.join(ns)} ({need})" for need, ns in by_need.items())
    print(hdr)
    print(text_table(head, rows))
    for r in results:
        if "median_ms" not in r and r.get("note"):
            print(f"note: {r['set']}/{r['dtype']} {r['impl']}: {r['note']}")
    copies = {(r["set"], r["dtype"]): (r["copy_gbs"], r["axpy_gbs"]) for r in results if "copy_gbs" in r}
    print("yardsticks per configuration, GB/s copy_ / axpy (a += alpha*b): " +
          ", ".join(f"{s}/{d} {c:.1f} / {a:.1f}" for (s, d), (c, a) in copies.items()))
    with open(base + ".md", "w") as f:
        f.write(hdr.replace("\n", "\n\n") + "\n\n" + md_table(head, rows) + "\n")
    if not args.no_chart:
        try:
            chart(base + ".png", results, f"{what} step, {dev_name}, torch {torch.__version__}, {mode} run, "
                                          f"{meta['commit']}")
        except Exception as exc:
            log(f"chart failed: {exc}")
    log(f"wrote {base}.csv, {base}.md" + ("" if args.no_chart else f", {base}.png"))
    if cache_dir:
        import shutil
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
