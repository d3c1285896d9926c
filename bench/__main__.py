"""python -m bench: time TVLARS/LARS optimizer steps (fused backends, eager reference, a foreach
step, torch.compile, and torch's SGD as the floor) on real parameter shapes.

    python -m bench                 quick subset (~2 min on a 2-core CPU): ResNet-50 and 2000 tiny
                                    tensors in float32, ResNet-50 in bfloat16, torch.compile once,
                                    and step() host overhead (161 / 2000 tensors of 16 elements:
                                    fused against torch's fused and foreach SGD)
    python -m bench --full          every set x float32/bfloat16 x every implementation, and the
                                    host-overhead rows
    python -m bench --sets resnet18,big64m --dtypes bfloat16 --impls eager,fused-cpu --steps 20

Per (parameter set, dtype) all implementations are built over identical copies of the same weights
and gradients, checked against the spec in float64 after their first step, warmed up, and then
timed in interleaved rounds (each round runs a block of steps of every implementation, plus a
big-tensor copy_ that gives the copy bandwidth under the same conditions), so that a machine shared
with other jobs slows them all alike and the ratios stay meaningful. Reported: the median step time,
speed-ups, effective bandwidth at the floor (20 B per float32 parameter: read w, g, state, write w,
state; 14 B for bfloat16 with float32 state), the bytes each design moves, and ops per step (CPU:
dispatcher ops from torch.profiler) or kernel launches and host syncs per step (GPU).

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
    ap.add_argument("--sets", help="comma-separated parameter sets (resnet18, resnet50, gpt2s, tiny2000, big64m)")
    ap.add_argument("--impls", help="comma-separated implementations (eager, foreach, compiled, fused-cpu, "
                    "fused-cpu-grad, fused-torch, fused-triton, fused-triton-grad, fused-triton-graph, "
                    "fused-cuda, sgd-foreach, sgd-fused; -grad: denominator='grad')")
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
    for s in sets or ():
        if s not in all_sets:
            raise SystemExit(f"unknown set {s!r}; choose from {', '.join(all_sets)}")
    for d in dtypes or ():
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    from bench.implementations import ALL
    for i in impls or ():
        if i not in ALL:
            raise SystemExit(f"unknown implementation {i!r}; choose from {', '.join(ALL)}")
    # step() host overhead: tensors too small to matter, the fused step against torch's fused SGD
    host = [i for i in all_impls if i.startswith("fused-") and i != "fused-torch" or i in ("sgd-fused", "sgd-foreach")]
    host_configs = [(s, "float32", host) for s in HOST_SETS]
    if args.full:
        sets, dtypes = sets or [s for s in all_sets if s not in HOST_SETS], dtypes or list(DTYPES)
        impls = [i for i in all_impls if i in (impls or all_impls)]
        return "full", [(s, d, impls) for s in sets for d in dtypes] + (host_configs if args.sets is None else [])
    if sets is None and impls is None and dtypes is None:
        # torch.compile once (it takes ~1-2 min on a 2-core CPU); the slow portable fused-torch path
        # only where it is cheap (tiny tensors)
        no_compile = [i for i in all_impls if i != "compiled"]
        big = [i for i in all_impls if i != "fused-torch"]
        return "quick", [("resnet50", "float32", big),
                         ("tiny2000", "float32", no_compile),
                         ("resnet50", "bfloat16", [i for i in big if i != "compiled"])] + host_configs
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


def profile_counts(torch, impl, device, steps: int, ops_from_profiler: bool) -> Dict[str, float]:
    """ops_per_step: outermost dispatcher ops per step (TorchDispatchMode; from torch.profiler
    for compiled code, which a dispatch mode would make Dynamo recompile). On a GPU also
    launches_per_step (device-side kernel, memcpy and memset events in torch.profiler) and
    syncs_per_step (warnings of torch.cuda.set_sync_debug_mode)."""
    cuda = device.type == "cuda"
    out: Dict[str, float] = {}
    if not ops_from_profiler:
        out["ops_per_step"] = count_ops(torch, impl, steps)
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
    if cuda:
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(1)
            try:
                for _ in range(steps):
                    impl.step()
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        torch.cuda.synchronize()
        out["syncs_per_step"] = sum("synchroniz" in str(w.message).lower() for w in caught) / steps
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

    def check(impl) -> float:
        """Largest per-tensor relative error of the momentum after the first step against the
        spec evaluated in float64 from the same weights and gradients (step 1: buf = q * d)."""
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
            den = float(t.double().square().sum().sqrt())
            num = float((m.detach().double() - t.double()).square().sum().sqrt())
            worst = max(worst, num / den if den > 0 else num)
        return worst

    for name in names:
        row = dict(set=set_name, dtype=dtype_name, impl=name, tensors=n_tensors, params=n_params)
        rows[name] = row
        if name == "compiled" and 0 < args.compile_max_tensors < n_tensors:
            row["note"] = (f"skipped: {n_tensors} tensors > --compile-max-tensors {args.compile_max_tensors} "
                           "(Inductor compile time grows with the tensor count)")
            log(f"{tag}: {row['note']}")
            continue
        try:
            impl = I.make(name, device)
            log(f"{tag}: setting up {name}" + (" (compiling)" if name == "compiled" else ""))
            if name == "compiled":
                import torch._dynamo.utils as du
                hits0 = du.counters["inductor"]["fxgraph_cache_hit"]
            impl.setup(fresh_params())
            if name == "compiled":
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
        if not args.no_check and impl.tvlars:
            rel = check(impl)
            row["check_rel_err"] = rel
            if not rel < CHECK_FAIL:
                row["note"] = (row.get("note", "") + f" CHECK FAILED: momentum after step 1 differs from "
                               f"the float64 spec by {rel:.1e} (relative, worst tensor)").strip()
                log(f"{tag}: {name} CHECK FAILED (rel err {rel:.1e})")
        # warm-up, and a first estimate of the step time
        w = timer.run(impl.step, max(args.warmup, 1))
        est[name] = min(w)
        impls[name] = impl
    truth = None

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

    floor = I.floor_bytes(dtype)
    for name, impl in impls.items():
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
                rows[name].update(profile_counts(torch, impl, device, 1,
                                                 ops_from_profiler=(name == "compiled")))
            except Exception as exc:  # profiling is a nice-to-have
                rows[name]["note"] = (rows[name].get("note", "") + f" profile failed: {exc}").strip()
    base = rows.get("eager", {}).get("median_ms")
    sgd = rows.get("sgd-foreach", {}).get("median_ms")
    for row in rows.values():
        if "median_ms" in row:
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
           "commit", "extension", "date", "loadavg_start", "loadavg_end"]


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
    cmap = plt.get_cmap("tab10")
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i, c in enumerate(configs) if (*c, impl) in by]
        rs = [by[(*c, impl)] for c in configs if (*c, impl) in by]
        axes[0].bar(xs, [r["median_ms"] for r in rs], width, label=impl, color=cmap(k % 10))
        axes[1].bar(xs, [r["pct_copy_bw"] for r in rs], width, color=cmap(k % 10))
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median ms / step (log)")
    axes[0].legend(ncol=min(len(impls), 5), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.08))
    axes[0].grid(axis="y", alpha=0.3, which="both")
    axes[1].set_ylabel("% of copy bandwidth at the floor\n(20 B/param float32, 14 B bfloat16)")
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
    skipped = [n for n in I.ALL if n not in all_impls]
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
    hdr = (f"TVLARS step benchmark ({mode}) on {dev_name}; torch {torch.__version__}; commit {meta['commit']}; "
           f"{meta['date']}\nextension: tvlars_fused._C {meta['extension']}\ncopy_ bandwidth alone: {copy_start:.1f} GB/s at start, {copy_end:.1f} GB/s at end; "
           f"load average "
           f"{meta['loadavg_start']} -> {meta['loadavg_end']}\n"
           f"ms/step: median; x eager: speed-up over the eager reference; /sgd-foreach: time relative to "
           f"torch SGD foreach; GB/s@floor: {I.floor_bytes(torch.float32)} B (float32) / "
           f"{I.floor_bytes(torch.bfloat16)} B (bfloat16) per parameter over the step time; %copy / %axpy: "
           f"that as a share of copy_ (2 x bytes) / a += alpha*b (3 x bytes) bandwidth timed in the same "
           f"rounds; B/param: bytes the design moves; " + ("launch/syncs: kernel launches / host syncs per step" if gpu else
                                     "ops/step: outermost dispatcher ops per step (TorchDispatchMode; profiler for compiled)"))
    if skipped:
        hdr += f"\nnot run on {device.type}: {', '.join(skipped)} (need a CUDA device)"
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
            chart(base + ".png", results, f"TVLARS step, {dev_name}, torch {torch.__version__}, {mode} run, "
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
