"""Benchmarks: kernel timings against the strongest baselines, end-to-end training, and a static report.

    python bench/run.py                       # GPU: every op in bench/specs.py, all providers (CPU: see below)
    python bench/run.py gelu attention --quick  # some ops, one shape each
    python bench/run.py --e2e [--quick] [--e2e-steps 15] [--e2e-filter REGEX]   # gpt2.train tokens/s, MFU, loss
    python bench/run.py --static [gelu ...]   # no GPU: AOT compile report, IO audit, floors; fails on spills
    python bench/run.py --compare A.json B.json   # differences; exit 1 if anything is >5% slower, 2 on a bad file
    python bench/run.py --cpu                 # what is meaningful without a GPU (the default there)

GPU mode: the same run first measures the card's copy bandwidth and bf16 matmul throughput, then times
each op's fwd / bwd / fwd+bwd for every provider with triton.testing.do_bench (CUDA events, L2 flushed
between repetitions, compile and autotune excluded by a warm-up call): median with p20/p80 (bwd: the
same method in `bench_backward`, a fresh untimed forward before each timed backward): `ms`. That
includes host launch time for small ops (Python, custom-op dispatch, autograd), so each mode is also
timed device-only with CUDA-graph replay (`time_graph`): `ms_graph`, or `graph_reason` when the
calls cannot be captured (an op that syncs the host). Each row relates its time (ms_graph when
there is one) to the op's ideal bytes (GB/s) or FLOPs (TFLOP/s) and to the measured limit, except the
fwd and bwd rows of a provider that computes the gradient in its forward (specs.Bench.grad_in_fwd: null
rates and speedups with a reason; compare those on fwd+bwd). A provider that cannot run is listed with
its reason. --e2e rewrites its JSON after every run.
Results: <out>/<date>_<gpu>_<kind>.json plus PNG
plots (default out: bench/results/) and a markdown table on the console.
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `bench` and `kernels` importable
    sys.path.insert(0, str(ROOT))

from bench import report, specs  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# Offline data next to the checkout (as tests/conftest.py does), when the caller has not chosen.
_SHARED = ROOT.parent / "shared" / "data"
if _SHARED.is_dir():
    os.environ.setdefault("GPT2_DATA_CACHE", str(_SHARED))
    if (_SHARED / "tiktoken_cache").is_dir():
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED / "tiktoken_cache"))
TRITON_MODULES = ("kernels.layernorm", "kernels.gelu", "kernels.attention", "kernels.adamw",
                  "kernels.cross_entropy", "kernels.linear_cross_entropy")
OURS_ROLE = ("triton", "cuda")


# ---- environment -------------------------------------------------------------------------------

def environment():
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv[1:]}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # reported, not fatal
        env["triton"] = f"unavailable ({e})"
    env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU: " + (platform.processor() or platform.machine()) + ")"
    env["driver"] = _driver()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        env["git_commit"] = (commit + ("+dirty" if dirty else "")) or os.environ.get("BENCH_GIT_COMMIT", "unknown")
    except OSError:
        env["git_commit"] = os.environ.get("BENCH_GIT_COMMIT", "unknown")  # a copied tree without .git
    return env


def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def write_doc(doc, out, kind, path=None, quiet=False):
    """Write doc as JSON (atomically: a reader or a kill never sees half a file); `path` rewrites the
    file an earlier call returned (incremental e2e results)."""
    if path is None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", doc["env"]["gpu"]).strip("-")[:40]
        stamp = doc["env"]["date"][:19].replace(":", "-")
        path = out / f"{stamp}_{gpu}_{kind}.json"
    problems = report.validate(doc)
    if problems and not quiet:  # a bug in this file: still write the data, but say so
        print("WARNING: result does not match the schema:\n  " + "\n  ".join(problems[:10]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# ---- GPU timings -------------------------------------------------------------------------------

def _median(result):
    """do_bench(quantiles=[0.5]) returns the median alone or in a one-element list, by Triton version."""
    return result[0] if isinstance(result, (list, tuple)) else result


def measure_limits(quick):
    """The card's copy bandwidth (1 GiB device-to-device copy: read + write) and bf16 matmul TFLOP/s."""
    import torch
    from triton.testing import do_bench

    x = torch.randn(2**30 // 4, dtype=torch.float32, device="cuda")  # random, not zeros: never time on zeros
    y = torch.empty_like(x)
    ms = _median(do_bench(lambda: y.copy_(x), warmup=25, rep=100, quantiles=[0.5]))
    copy_gbps = 2 * x.numel() * 4 / ms / 1e6
    del x, y
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _median(do_bench(lambda: a @ b, warmup=25, rep=50 if quick else 100, quantiles=[0.5]))
    return {"copy_gbps": copy_gbps, "matmul_tflops": 2 * n**3 / ms / 1e9,
            "how": "medians; copy: 1 GiB fp32 y.copy_(x), 2 bytes moved per byte; matmul: 8192^3 bf16 a @ b"}


class CudaClock:
    """What the GPU timings run on: CUDA events, the L2 flush, triton's do_bench and CUDA graphs.
    tests/test_bench.py swaps in a CPU stand-in with the same methods (CpuClock) to run the whole
    GPU pipeline without a GPU."""
    device = "cuda"

    def __init__(self):
        import torch

        self.torch = torch
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.l2_bytes = getattr(props, "L2_cache_size", 0) or 50 * 2**20
        self._cache = None

    def sync(self):
        self.torch.cuda.synchronize()

    def interval(self):
        """(start, stop, elapsed_ms): a pair of CUDA events."""
        s, e = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        return s.record, e.record, lambda: s.elapsed_time(e)

    def flush_l2(self):
        if self._cache is None:  # as triton.testing.do_bench: write 256 MiB
            self._cache = self.torch.empty(256 * 2**20 // 4, dtype=self.torch.int32, device="cuda")
        self._cache.zero_()

    def do_bench(self, fn, rep, grad_to_none):
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])

    def side_stream(self):
        s = self.torch.cuda.Stream()
        s.wait_stream(self.torch.cuda.current_stream())
        return s

    def on(self, stream):
        return self.torch.cuda.stream(stream)

    def capture(self, body, stream):
        """One CUDA graph of everything `body` launches on `stream`; returns its replay. Raises
        GraphUnavailable with the first error (an op that syncs the host cannot be captured)."""
        g, err = self.torch.cuda.CUDAGraph(), None
        self.sync()
        with self.on(stream):
            g.capture_begin()
            try:
                body()
            except Exception as e:
                err = e
            try:
                g.capture_end()
            except Exception as e:
                err = err or e
        if err is not None:
            raise GraphUnavailable(f"capture failed: {type(err).__name__}: {str(err).strip()}"[:600])
        return g.replay

    def memory_allocated(self):
        return self.torch.cuda.memory_allocated()

    def reset_peak(self):
        self.torch.cuda.reset_peak_memory_stats()

    def max_memory_allocated(self):
        return self.torch.cuda.max_memory_allocated()

    def free_bytes(self):
        return self.torch.cuda.mem_get_info()[0]

    def empty_cache(self):
        self.torch.cuda.empty_cache()


class Unavailable(Exception):
    pass


class GraphUnavailable(Exception):
    pass


def build_provider(b, name):
    """The callable for provider `name` of bench b, or raise Unavailable with the reason."""
    import kernels

    if name in specs.BASELINES:
        try:
            return specs.BASELINES[name][1](b.op)
        except Exception as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from e
    op = specs.COMPANION_OF.get(b.op, b.op)  # add_layer_norm comes with layer_norm's backend
    try:
        ops = kernels.get_ops(f"torch,{op}={name}")
    except (kernels.BackendUnavailable, ValueError) as e:
        raise Unavailable(str(e).replace("\n", " ")) from e
    return getattr(ops, b.op)


def _backward(out, dy, retain_graph=None):
    """out.backward(dy), also for a tuple of outputs with a tuple of gradients."""
    import torch

    torch.autograd.backward(out, dy, retain_graph=retain_graph)


def _prepare(b, fn, device):
    """(call, dy, leaves): one input set, warmed up (compile and autotune happen here, untimed)."""
    import torch

    args, kwargs, leaves = specs.make_inputs(b, device)
    if b.op == "AdamW":
        (params,) = args
        opt = fn(specs.adamw_groups(params), lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
        opt.step()  # allocates the state; compiles / autotunes
        return opt.step, None, []
    out = fn(*args, **kwargs)
    if isinstance(out, tuple):  # several outputs (add_layer_norm's s and y): a gradient for each
        dy = tuple(torch.randn_like(o) for o in out)
    else:
        dy = torch.randn_like(out) if out.numel() > 1 else None
    _backward(out, dy)
    for t in leaves:
        t.grad = None
    return (lambda: fn(*args, **kwargs)), dy, leaves


def time_row(b, mode, fn, rep, clock, graphs=True):
    """Timings of one mode of one provider: do_bench's ms, ms_p20, ms_p80, peak_mem_bytes (PEAK_MEM_NOTE:
    for "bwd", the backward alone after an untimed forward), and, with `graphs`, the CUDA-graph replay
    time (ms_graph...) or why there is none."""
    forward, dy, leaves = _prepare(b, fn, clock.device)

    def run():
        if mode in ("fwd", "step"):
            return forward()
        _backward(forward(), dy)
    clock.sync()
    out = forward() if mode == "bwd" else None  # bwd: the forward's output and saved tensors are the base
    clock.sync()
    base = clock.memory_allocated()
    clock.reset_peak()
    if mode == "bwd":
        _backward(out, dy)
    else:
        run()
    clock.sync()
    del out
    res = {"peak_mem_bytes": clock.max_memory_allocated() - base}
    for t in leaves:
        t.grad = None
    if mode == "bwd":
        ms, p20, p80 = bench_backward(forward, dy, leaves, rep, clock)
    else:
        ms, p20, p80 = clock.do_bench(run, rep, leaves or None)
    res.update(ms=ms, ms_p20=p20, ms_p80=p80)
    del forward, dy, leaves, run
    if graphs:
        try:
            res.update(time_graph(b, mode, fn, clock, ms, rep))
        except GraphUnavailable as e:
            res["graph_reason"] = str(e)
        except Exception as e:  # OOM and the like: the do_bench numbers stand, say why there is no graph time
            res["graph_reason"] = f"{type(e).__name__}: {e}"[:600]
        try:
            clock.sync()
        except Exception as e:  # a failed capture that broke the context: later rows will say so too
            res["graph_reason"] += f"; then the device reported {type(e).__name__}: {e}"[:300]
        clock.empty_cache()
    return res


def bench_backward(forward, dy, leaves, rep, clock, warmup=25):
    """do_bench for a backward alone: each repetition runs a fresh forward (untimed), flushes L2, and
    times `backward` between CUDA events. Calling backward again on one graph (retain_graph) is not
    an option: a fused loss scales the gradient it saved in place, so its graph runs backward once."""
    def once():
        out = forward()
        for t in leaves:
            t.grad = None
        clock.flush_l2()
        start, stop, elapsed = clock.interval()
        start()
        _backward(out, dy)
        stop()
        return elapsed

    probe = [once() for _ in range(5)]
    clock.sync()
    estimate = max(1e-3, sum(e() for e in probe) / 5)
    for _ in range(max(1, int(warmup / estimate))):
        once()
    timed = [once() for _ in range(max(1, int(rep / estimate)))]
    clock.sync()
    return _quantiles([e() for e in timed])


def _quantiles(times):
    """median, p20, p80 (linear interpolation, as torch.quantile)."""
    xs = sorted(times)

    def q(p):
        k = p * (len(xs) - 1)
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    return [q(0.5), q(0.2), q(0.8)]


GRAPH_TARGET_MS = 20.0  # device time of the calls captured in one graph (estimated from do_bench)
GRAPH_MAX_CALLS = 200
GRAPH_MIN_REPLAYS = 10
MAX_INPUT_SETS = 8


def input_sets(b, mode, l2_bytes):
    """How many copies of the inputs the captured calls rotate through: enough that at least 2x the L2
    size moves between two uses of one copy (one copy when a call already moves that much)."""
    moved = specs.ideal_bytes(b, "fwd+bwd" if mode == "bwd" else mode)
    return max(1, min(MAX_INPUT_SETS, -(-2 * l2_bytes // max(1, moved))))


def time_graph(b, mode, fn, clock, ms_hint, rep):
    """Device-only time of one call: n calls captured in one CUDA graph, the graph replayed back to
    back between CUDA events, ms_graph = median over replays of (replay time / n). Host work (Python,
    custom-op dispatch, launchers, autograd) is out: the graph has only the kernels. No L2 flush
    inside the graph: the calls rotate through K input copies (input_sets) so inputs that fit in L2
    are not re-read from it. fwd: the forward with autograd recording (as in training); fwd+bwd: both
    captured together; bwd: n forwards run eagerly before capture (their graphs kept alive), the
    capture holds only the n backwards (retain_graph=True keeps the saved tensors; each graph's
    backward is captured once; torch.compile baselines are built without donated buffers, which refuse
    retain_graph: specs.no_donated_buffers); step (AdamW): the optimizer step (the AdamW baselines are
    capturable=True)."""
    k = input_sets(b, mode, clock.l2_bytes)
    n = max(1, min(GRAPH_MAX_CALLS, round(GRAPH_TARGET_MS / max(ms_hint, 1e-4))))
    sets = [_prepare(b, fn, clock.device) for _ in range(k)]
    clock.sync()
    stream = clock.side_stream()
    outs = []
    with clock.on(stream):  # warm-up on the capture stream, as CUDA graph capture requires
        for forward, dy, leaves in sets:
            for _ in range(2):
                if mode in ("fwd", "step"):
                    forward()
                else:
                    _backward(forward(), dy)
                for t in leaves:
                    t.grad = None
        if mode == "bwd":  # the backwards' graphs: kept alive until the timing is done
            before = clock.memory_allocated()
            outs.append(sets[0][0]())
            clock.sync()
            per_call = max(1, clock.memory_allocated() - before)
            n = max(1, min(n, int(0.4 * clock.free_bytes() / per_call)))
    n = -(-n // k) * k  # a multiple of K: every replay starts where the previous one left L2
    if mode == "bwd":
        with clock.on(stream):
            outs += [sets[i % k][0]() for i in range(len(outs), n)]
    clock.sync()

    def body():
        for i in range(n):
            forward, dy, leaves = sets[i % k]
            if mode in ("fwd", "step"):
                forward()
                continue
            if mode == "bwd":
                _backward(outs[i], dy, retain_graph=True)
            else:
                _backward(forward(), dy)
            for t in leaves:
                t.grad = None
    replay = clock.capture(body, stream)
    replay()  # first replay: uploads the graph
    clock.sync()
    start, stop, elapsed = clock.interval()
    start()
    replay()
    stop()
    clock.sync()
    per_replay = max(1e-3, elapsed())
    reps = max(GRAPH_MIN_REPLAYS, min(200, int(rep / per_replay)))
    timed = []
    replay()  # keeps the device busy while the host records the first timed replay: no launch gap
    for _ in range(reps):
        start, stop, elapsed = clock.interval()
        start()
        replay()
        stop()
        timed.append(elapsed)
    clock.sync()
    ms, p20, p80 = _quantiles([e() / n for e in timed])
    return {"ms_graph": ms, "ms_graph_p20": p20, "ms_graph_p80": p80,
            "graph": {"calls": n, "input_sets": k, "replays": reps}}


def run_gpu(args, clock=None, limits=None):
    env = environment()
    clock = clock or CudaClock()
    if limits is None:
        print(f"# {env['gpu']}: measuring copy bandwidth and bf16 matmul throughput...", flush=True)
        limits = measure_limits(args.quick)
    print(f"#   copy {limits['copy_gbps']:.0f} GB/s, matmul {limits['matmul_tflops']:.0f} TFLOP/s", flush=True)
    rows = []
    for b in specs.selected(args.ops, args.quick):
        built = {}
        for name in b.providers:
            try:
                built[name] = build_provider(b, name)
            except Unavailable as e:
                built[name] = e
        for mode in b.modes:
            group = []
            for name in b.providers:
                row = {"op": b.op, "variant": b.variant, "mode": mode, "provider": name,
                       "role": "ours" if name in OURS_ROLE else "baseline"}
                fn = built[name]
                if isinstance(fn, Unavailable):
                    row.update(status="unavailable", reason=str(fn))
                else:
                    t0 = time.time()
                    try:
                        res = time_row(b, mode, fn, args.rep, clock, graphs=not args.no_graphs)
                    except Exception as e:  # OOM, a backend that refuses the shape: listed, never dropped
                        row.update(status="error", reason=f"{type(e).__name__}: {e}"[:1000])
                    else:
                        if args.no_graphs:
                            res["graph_reason"] = "not measured (--no-graphs)"
                        row.update(_metrics(b, mode, res, limits, name))
                    row["wall_s"] = round(time.time() - t0, 1)
                    clock.empty_cache()
                group.append(row)
                _progress(row)
            _speedups(group, b)
            rows += group
    doc = {"schema": report.SCHEMA, "kind": "gpu", "env": env, "limits": limits, "rows": rows,
           "settings": {"warmup_ms": 25, "rep_ms": args.rep, "quantiles": [0.5, 0.2, 0.8], "quick": args.quick,
                        "timing": TIMING_NOTE, "peak_mem": PEAK_MEM_NOTE, "graphs": not args.no_graphs,
                        "l2_bytes": clock.l2_bytes}}
    if clock.__class__ is CudaClock and not args.ops:  # all ops asked for: decode throughput too
        doc["decode"] = decode_rows("cuda", args.quick)
        _print_decode(doc["decode"])
    _finish(doc, args, "gpu")
    return 0


TIMING_NOTE = (
    "ms: triton.testing.do_bench around one eager call (L2 flushed between repetitions; bwd: a fresh "
    "untimed forward per repetition); for small ops it includes host launch time (Python, custom-op "
    "dispatch, autograd) whenever the GPU outruns the CPU. ms_graph: device-only, n calls captured in "
    "one CUDA graph and replayed back to back between CUDA events, median over replays of time / n; "
    "inputs rotate among `graph.input_sets` copies so >= 2x L2 moves between reuses (no flush inside "
    "the graph); bwd captures only the backwards of forwards run before capture. GB/s, TFLOP/s, "
    "% of limit and speedups use ms_graph when the row has it (timing_basis), else ms. torch.compile "
    "baselines are built without donated buffers and the AdamW baselines with capturable=True, so that "
    "they can be captured too; a row that still cannot be says why in graph_reason.")
PEAK_MEM_NOTE = (
    "peak_mem_bytes: the peak of torch.cuda.max_memory_allocated during one untimed call, above what was "
    "allocated just before it: fwd, fwd+bwd and step above the inputs (and optimizer state); bwd is the "
    "backward alone, above the inputs plus the output and saved tensors of a forward run just before.")


def decode_rows(device, quick, models=("tiny", "gpt2")):
    """Generation throughput with the KV cache (gpt2.generate.decode_tokens_per_sec): new tokens/s at
    batch 1 and 16, random weights, top-k 50 sampling, prefill of a 16-token prompt included."""
    import torch

    from gpt2.generate import decode_tokens_per_sec
    from gpt2.model import GPT, GPTConfig

    rows = []
    new_tokens = 16 if device == "cpu" or quick else 128
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else None
    for name in models:
        try:
            model = GPT(GPTConfig.preset(name)).to(device).eval()
        except Exception as e:
            rows.append({"model": name, "status": "error", "reason": f"{type(e).__name__}: {e}"})
            continue
        for batch in (1, 16):
            row = {"model": name, "batch": batch, "new_tokens": new_tokens, "device": device}
            try:
                with torch.no_grad():
                    row["tokens_per_sec"] = decode_tokens_per_sec(model, batch, new_tokens, autocast=autocast)
                row["status"] = "ok"
            except Exception as e:  # listed, never dropped
                row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
        del model
    return rows


def _print_decode(rows):
    print("\n**decode** (KV cache, new tokens/s over all rows)\n\n| model | batch | new tokens | tokens/s |\n|---|---|---|---|")
    for r in rows:
        val = f"{r['tokens_per_sec']:,.0f}" if r["status"] == "ok" else f"{r['status']}: {r['reason'][:120]}"
        print(f"| {r['model']} | {r.get('batch', '-')} | {r.get('new_tokens', '-')} | {val} |")


GRAD_IN_FWD_REASON = ("not comparable: this provider computes the gradient in its forward, so its fwd does "
                      "the backward's work and its bwd almost none; compare on fwd+bwd")


def not_comparable(b, mode, provider):
    """Why rates (GB/s, TFLOP/s, % of limit) and speedups of this row mean nothing, or None."""
    return GRAD_IN_FWD_REASON if provider in b.grad_in_fwd and mode in ("fwd", "bwd") else None


def _metrics(b, mode, res, limits, provider=None):
    nbytes, nflops = specs.ideal_bytes(b, mode), specs.flops(b, mode)
    basis = "graph" if "ms_graph" in res else "do_bench"
    t = res["ms_graph"] if basis == "graph" else res["ms"]
    gbps, tflops = nbytes / t / 1e6, nflops / t / 1e9
    pct = 100 * (tflops / limits["matmul_tflops"] if b.bound == "compute" else gbps / limits["copy_gbps"])
    out = {"status": "ok", **res, "timing_basis": basis, "bytes": nbytes, "flops": nflops,
           "gbps": gbps, "tflops": tflops, "bound": b.bound, "pct_of_limit": pct}
    reason = not_comparable(b, mode, provider)
    if reason:  # timings stay; the rates against this mode's ideal bytes / FLOPs would be wrong
        out.update(gbps=None, tflops=None, pct_of_limit=None, pct_reason=reason)
    return out


def _speedups(group, b=None):
    """Ours against each baseline on the graph times when both rows have one, else on do_bench's; null
    with speedup_reason for a row that is not comparable (not_comparable)."""
    base = [r for r in group if r["role"] == "baseline" and r["status"] == "ok"]
    for r in group:
        if r["role"] == "ours" and r["status"] == "ok":
            reason = not_comparable(b, r["mode"], r["provider"]) if b is not None else None
            if reason:
                r.update(speedup=None, speedup_basis=None, speedup_reason=reason)
                continue
            r["speedup"], r["speedup_basis"] = {}, {}
            for x in base:
                key = "ms_graph" if "ms_graph" in r and "ms_graph" in x else "ms"
                r["speedup"][x["provider"]] = x[key] / r[key]
                r["speedup_basis"][x["provider"]] = "graph" if key == "ms_graph" else "do_bench"


def _progress(r):
    what = f"{r['op']:<20} {r['variant']:<26} {r['mode']:<8} {r['provider']:<11}"
    if r["status"] == "ok":
        g = f"graph {r['ms_graph']:8.3f} ms" if "ms_graph" in r else f"graph: {report._short(r.get('graph_reason'), 80)}"
        pct = "n/a (compare fwd+bwd)" if r["pct_of_limit"] is None else f"{r['pct_of_limit']:5.1f}% of limit"
        print(f"  {what} {r['ms']:8.3f} ms  {g}  {pct}", flush=True)
    else:
        print(f"  {what} {r['status']}: {report._short(r['reason'], 140)}", flush=True)


def _finish(doc, args, kind, path=None):
    print()
    print(report.markdown(doc) if kind in ("gpu", "e2e") else "")
    if args.out or kind in ("gpu", "e2e"):
        path = write_doc(doc, args.out or RESULTS, kind, path)
        print(f"\nwrote {path}")
        if kind == "gpu":
            for p in report.plots(doc, str(path.with_suffix(""))):
                print(f"wrote {p}")


# ---- end to end --------------------------------------------------------------------------------

def e2e_configs():
    """(name, spec, flags): the headline configurations, the host-overhead cures (--cuda-graph: the eager
    micro-step replayed from a CUDA graph; torch.compile's reduce-overhead mode), then one single-op switch
    from torch each. `flags` are extra gpt2.train arguments; the name is the spec followed by them."""
    reduce_overhead = ("--compile", "--compile-mode", "reduce-overhead")
    runs = [("torch", ()), ("torch", ("--compile",)), ("triton", ()), ("triton,cross_entropy=cuda", ()),
            ("triton", ("--compile",)), ("triton,cross_entropy=cuda", ("--compile",)),
            ("torch", ("--cuda-graph",)), ("triton,cross_entropy=cuda", ("--cuda-graph",)),
            ("torch", reduce_overhead), ("triton,cross_entropy=cuda", reduce_overhead)]
    runs += [(f"torch,{op}={be}", ()) for op, be in specs.E2E_ABLATIONS]
    return [(" ".join((spec, *flags)), spec, flags) for spec, flags in runs]


# --quick: the eager headline runs and the same with --cuda-graph (no compile time: a few minutes in all)
QUICK_E2E = ("torch", "triton", "triton,cross_entropy=cuda", "torch --cuda-graph", "triton,cross_entropy=cuda --cuda-graph")


def e2e_selected(args):
    """The (name, spec, flags) runs of this invocation: --quick keeps QUICK_E2E, --e2e-filter the names
    its regex matches (both: the intersection)."""
    return [(name, spec, flags) for name, spec, flags in e2e_configs()
            if (not args.e2e_filter or re.search(args.e2e_filter, name))
            and (not args.quick or name in QUICK_E2E)]


def run_e2e(args, runner=None):
    """One gpt2.train run per selected configuration. The JSON is rewritten after every run, so an
    outer timeout that kills this process mid-way leaves the runs that finished (settings.planned
    lists all of them). `runner` replaces train_run (tests)."""
    import torch

    import kernels

    env = environment()
    if runner is None and not torch.cuda.is_available():
        print("NOTE: --e2e needs a CUDA GPU (GPT-2 124M at B=16, T=1024); nothing was run. "
              "`python bench/run.py` without a GPU times the tiny model on the CPU instead.")
        return 0
    runner = runner or train_run
    selected = e2e_selected(args)
    if not selected:
        print(f"--e2e: no run matches (filter {args.e2e_filter!r}, quick={args.quick}); runs: "
              + ", ".join(repr(n) for n, _, _ in e2e_configs()))
        return 2
    rows = []
    doc = {"schema": report.SCHEMA, "kind": "e2e", "env": env, "rows": [], "e2e": rows,
           "settings": {"model": "gpt2", "batch_size": args.e2e_batch, "seq_len": args.e2e_seq,
                        "total_batch_size": args.e2e_batch * args.e2e_seq, "steps": args.e2e_steps,
                        "warmup_steps_excluded": args.e2e_warmup, "profiled_steps": args.e2e_profile,
                        "timeout_s": args.e2e_timeout,
                        "data": args.data, "planned": [n for n, _, _ in selected]}}
    out = Path(args.out or RESULTS)
    path = None
    print(f"# --e2e: {len(selected)} run(s) of {args.e2e_steps} steps (first {args.e2e_warmup} excluded), "
          f"B={args.e2e_batch} T={args.e2e_seq}, then {args.e2e_profile} profiled step(s) (not timed), "
          f"timeout {args.e2e_timeout} s each", flush=True)
    for name, spec, flags in selected:
        row = {"name": name, "spec": spec, "compile": "--compile" in flags, "flags": list(flags)}
        try:
            kernels.get_ops(spec)
        except (kernels.BackendUnavailable, ValueError) as e:
            rows.append({**row, "status": "unavailable", "reason": str(e).replace("\n", " ")})
        else:
            try:
                rows.append({**row, **runner(spec, flags, args, out / "e2e" / _slug(name))})
            except Exception as e:  # a bug here must not lose the runs before it
                rows.append({**row, "status": "error", "reason": f"{type(e).__name__}: {e}"[:1000]})
        r = rows[-1]
        print(f"  {name}: " + (f"{r['tokens_per_sec']:,.0f} tok/s, loss {r['loss']:.4f}" if r["status"] == "ok"
                               else f"{r['status']}: {report._short(r['reason'], 200)}"), flush=True)
        doc["settings"]["completed"] = len(rows)
        path = write_doc(doc, out, "e2e", path, quiet=True)
    _finish(doc, args, "e2e", path)
    return 0


def _slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def train_run(spec, flags, args, out, model="gpt2"):
    """Run gpt2.train for args.e2e_steps steps with the extra trainer arguments `flags` (e.g. ("--cuda-graph",));
    summarize log.jsonl without the warm-up steps."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    B, T = args.e2e_batch, args.e2e_seq
    profiled = getattr(args, "e2e_profile", 0)  # extra steps at the end, under the profiler (not timed)
    cmd = [sys.executable, "-m", "gpt2.train", "--model", model, "--kernels", spec, "--batch-size", str(B),
           "--seq-len", str(T), "--total-batch-size", str(B * T), "--max-steps", str(args.e2e_steps + profiled),
           *(("--profile", str(profiled)) if profiled else ()),
           "--out", str(out), "--eval-every", "0", "--hellaswag-every", "0", "--sample-every", "0",
           "--sample-tokens", "0", "--checkpoint-every", "0", "--no-checkpoint", "--data", args.data, "--quiet",
           *flags]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.e2e_timeout)
    except subprocess.TimeoutExpired:
        logged = ""
        if (out / "log.jsonl").exists():
            logged = f" ({len((out / 'log.jsonl').read_text().splitlines())} steps logged)"
        failure = f"timed out after {args.e2e_timeout} s{logged}: {' '.join(cmd)}"
        return _timed_steps_only(out, args, failure, float(args.e2e_timeout))
    wall = round(time.time() - t0, 1)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines() or ["(no stderr)"]
        return _timed_steps_only(out, args, f"exit {proc.returncode}: {err[-1]}\n" + "\n".join(err[-30:]), wall)
    return {**summarize_log(out / "log.jsonl", args.e2e_warmup), "wall_s": wall}


def _timed_steps_only(out, args, failure, wall):
    """A run that failed or timed out: an error, unless every timed step was logged before it (the failure
    came in the profiled steps after them, a diagnostic): then the run's row, with the failure noted."""
    log = out / "log.jsonl"
    timed = []
    for line in (log.read_text().splitlines() if log.exists() else [])[:args.e2e_steps]:
        try:
            timed.append(json.loads(line))
        except ValueError:  # a line cut short by the kill
            break
    if getattr(args, "e2e_profile", 0) and len(timed) == args.e2e_steps and not any(r.get("profiled") for r in timed):
        return {**summarize_log(log, args.e2e_warmup, limit=args.e2e_steps), "wall_s": wall,
                "profile_error": failure[:2000]}  # in the profiled steps, after the timed ones had finished
    return {"status": "error", "reason": failure, "wall_s": wall}


def summarize_log(path, warmup, limit=None):
    """The medians of a run's log.jsonl after `warmup` steps, leaving out the profiled steps (the profiler slows
    the host), with the profile of those (profile.json next to the log: gpt2/profile.py) when there is one.
    limit: read only the first `limit` lines."""
    steps = [json.loads(line) for line in Path(path).read_text().splitlines()[:limit] if line.strip()]
    steps = [s for s in steps if "tokens_per_sec" in s]
    measured = [s for s in steps[warmup:] if not s.get("profiled")]
    if not measured:
        return {"status": "error", "reason": f"{path}: {len(steps)} steps logged, none after the {warmup} warm-up steps"}
    med = lambda k: statistics.median(s[k] for s in measured) if all(s.get(k) is not None for s in measured) else None  # noqa: E731
    peaks = [s["peak_mem_bytes"] for s in steps if s.get("peak_mem_bytes") is not None]
    row = {"status": "ok", "tokens_per_sec": med("tokens_per_sec"), "mfu": med("mfu"),
           "step_time_s": med("step_time_s"), "peak_mem_bytes": max(peaks) if peaks else None,
           "loss": steps[-1]["loss"], "steps": len(steps), "steps_measured": len(measured)}
    profile = Path(path).with_name("profile.json")
    if any(s.get("profiled") for s in steps) and profile.exists():
        row["profile"] = json.loads(profile.read_text())
    return row


# ---- static report (no GPU) --------------------------------------------------------------------

def triton_modules(ops=None):
    """(with_kernels, drivers, missing): our Triton modules (the registry's, TRITON_MODULES and any
    kernels/*.py with @triton.jit), split into those with @triton.jit kernels (each must define
    compile_specs()), pure-Python drivers of other modules' kernels, and not written yet."""
    import importlib.util

    import kernels

    registry = {t.split(":")[0]: op for op, impls in kernels._REGISTRY.items() for b, t in impls.items() if b == "triton"}
    if ops:
        wanted = set(ops) | {specs.COMPANION_OF[o] for o in ops if o in specs.COMPANION_OF}
        names = {m for m, op in registry.items() if op in wanted}
    else:
        names = set(TRITON_MODULES) | set(registry)
        names |= {f"kernels.{f.stem}" for f in (ROOT / "kernels").glob("*.py")
                  if not f.name.startswith("_") and "@triton.jit" in f.read_text()}
    with_kernels, drivers, missing = [], [], []
    for n in sorted(names):
        spec = importlib.util.find_spec(n)
        if spec is None:
            missing.append(n)
        elif "@triton.jit" in Path(spec.origin).read_text():
            with_kernels.append(n)
        else:
            drivers.append(n)
    return with_kernels, drivers, missing


def static_problems(row):
    """(failures, warnings) of one compile row: a spill, a shared-memory overflow, a matmul kernel off its
    tensor-core path (AotSpec.mma) or a failed compile fail `--static`; no 128-bit loads where expected is
    a warning."""
    if row.get("error"):
        lines = row["error"].strip().splitlines() or ["?"]
        return [f"compile failed: {lines[0][:200]}" + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")], []
    fails = []
    if row.get("spill_bytes"):
        fails.append(f"{row['spill_bytes']} bytes of register spills")
    limit = row.get("shared_limit") or _SHARED_LIMIT.get(row.get("arch"))
    if limit and row.get("shared_bytes", 0) > limit:
        fails.append(f"shared memory {row['shared_bytes']} B > limit {limit} B")
    from kernels._triton_utils import mma_problems

    fails += mma_problems(row)  # a matmul kernel off the tensor-core path it should take
    warns = []
    if row.get("expect_ld128") and row.get("ld128") == 0:
        warns.append("no 128-bit global loads")
    return fails, warns


_SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def _mma_cell(row):
    """The static table's MMA column: the tensor-core instructions in a matmul kernel's PTX."""
    counts = [f"{n} {k}" for k, n in (("wgmma", row.get("wgmma")), ("mma.sync", row.get("mma_sync"))) if n]
    return ", ".join(counts) or ("none" if row.get("expect_mma") else "-")


def run_static(args):
    from kernels import _triton_utils

    failures = []
    existing, drivers, missing = triton_modules(args.ops)
    print("## Static report (no GPU): AOT compile for sm_80 / sm_90\n")
    print("| module | kernel | arch | regs | spill B | shared B | 128-bit loads | MMA | status |\n|---|---|---|---|---|---|---|---|---|")
    t_rows = []
    for m in existing:
        try:
            rows = _triton_utils.static_report([m])
        except Exception as e:  # the module failed to import or has no compile_specs()
            rows = [{"name": "-", "arch": "-", "error": f"{type(e).__name__}: {str(e)[-500:]}"}]
        for r in rows:
            r["module"] = m
        t_rows += rows
    for m in missing:
        print(f"| {m} | - | - | | | | | | missing (not written yet; not a failure) |")
    for m in drivers:
        print(f"| {m} | - | - | | | | | | no @triton.jit kernels of its own (drives other modules' kernels) |")
    if not args.ops or args.ops & {"cross_entropy", "linear_cross_entropy"}:
        t_rows += _cuda_rows()
    for r in t_rows:
        if r.get("status") == "missing":
            print(f"| {r['module']} | - | - | | | | | | missing: {report._short(r['reason'])} |")
            continue
        fails, warns = static_problems(r)
        failures += [f"{r['module']} {r.get('name')} {r.get('arch')}: {f}" for f in fails]
        status = "FAIL: " + "; ".join(fails) if fails else ("warn: " + "; ".join(warns) if warns else "ok")
        ld = r.get("ld128")
        print(f"| {r['module']} | {r.get('name')} | {r.get('arch')} | {r.get('registers', '-')} | {r.get('spill_bytes', '-')} "
              f"| {r.get('shared_bytes', '-')} | {'-' if ld is None else ld} | {_mma_cell(r)} | {report._short(status, 200)} |")

    print("\n## IO audit (Triton interpreter, 256 x 768-like shapes)\n")
    from bench import io_audit

    try:
        audit = io_audit.audit(None if not args.ops else
                               [n for n, (op, *_) in io_audit.AUDITS.items()
                                if op in args.ops or op == "-" or op in {specs.COMPANION_OF.get(o) for o in args.ops}])
        print(io_audit.table(audit))
    except Exception as e:  # reported; tests/test_bench.py enforces the audit
        audit = [{"kernel": "-", "status": "error", "reason": f"{type(e).__name__}: {e}"}]
        print(f"IO audit failed: {e}")
    print(f"(unique/ideal must stay <= {io_audit.LIMIT}: enforced by tests/test_bench.py)")

    print("\n## Floors: ideal bytes and FLOPs at GPT-2 shapes, time at datasheet peaks\n")
    cards = list(specs.CARDS)
    print("| op | variant | mode | ideal bytes | FLOPs | " + " | ".join(f"floor {c}" for c in cards) + " |")
    print("|---|---|---|---|---|" + "---|" * len(cards))
    floors = []
    for b in specs.selected(args.ops):
        for mode in b.modes:
            f = {c: specs.floor_seconds(b, mode, c) for c in cards}
            floors.append({"op": b.op, "variant": b.variant, "mode": mode, "bytes": specs.ideal_bytes(b, mode),
                           "flops": specs.flops(b, mode), "floor_s": f})
            print(f"| {b.op} | {b.variant} | {mode} | {specs.fmt_si(floors[-1]['bytes'], 'B')} | "
                  f"{specs.fmt_si(floors[-1]['flops'], 'FLOP') if floors[-1]['flops'] else '-'} | "
                  + " | ".join(f"{1e3 * f[c]:.3f} ms" for c in cards) + " |")
    doc = {"schema": report.SCHEMA, "kind": "static", "env": environment(), "rows": [],
           "static": {"compile": t_rows, "missing": missing, "drivers": drivers, "io_audit": audit, "floors": floors, "failures": failures}}
    if args.out:
        print(f"\nwrote {write_doc(doc, args.out, 'static')}")
    if failures:
        print(f"\nFAILED: {len(failures)} kernel(s) spill, overflow shared memory, miss their tensor-core path "
              "or do not compile:")
        print("\n".join(f"  - {f}" for f in failures))
        return 1
    print(f"\nstatic report ok: {len(t_rows)} compile rows, no spills, shared memory within limits, "
          "matmul kernels on tensor cores (wgmma on sm_90)")
    return 0


def _cuda_rows():
    """The CUDA classifier's `nvcc -Xptxas -v` rows (kernels.classifier.ptxas_report)."""
    import importlib.util

    if importlib.util.find_spec("kernels.classifier") is None:
        return [{"module": "kernels.classifier", "status": "missing", "reason": "kernels/classifier.py does not exist yet"}]
    try:
        import kernels.classifier as cls

        report_fn = getattr(cls, "ptxas_report", None)
        if report_fn is None:
            return [{"module": "kernels.classifier", "status": "missing", "reason": "kernels.classifier has no ptxas_report()"}]
        if cls.cuda_home() is None:
            return [{"module": "kernels.classifier", "status": "missing", "reason": "no nvcc: the CUDA toolkit is not installed"}]
        rows = report_fn()
    except Exception as e:
        return [{"module": "kernels.classifier", "name": "-", "arch": "-", "error": f"{type(e).__name__}: {str(e)[-800:]}"}]
    for r in rows:
        r["module"] = "kernels.classifier (nvcc)"
    return rows


# ---- CPU mode ----------------------------------------------------------------------------------

def run_cpu(args):
    import torch
    from torch.utils import benchmark as tb

    print("NOTE: no CUDA GPU visible: the GPU kernels were NOT timed. What follows is what is meaningful on a CPU;\n"
          "      `python bench/run.py --static` checks the kernels without a GPU.\n")
    env, rows = environment(), []
    # 1. The C++ CPU cross-entropy against F.cross_entropy and the eager reference.
    import torch.nn.functional as F

    import kernels
    from kernels import reference

    N, V = (32, 50304) if args.quick else (128, 50304)
    logits = torch.randn(N, V, requires_grad=True)
    targets = torch.randint(0, 50257, (N,))
    fns = {"F.cross_entropy": lambda lg, t: F.cross_entropy(lg[:, :50257], t), "eager reference": reference.cross_entropy}
    try:
        fns["cuda backend (C++ CPU)"] = kernels.get_ops("torch,cross_entropy=cuda").cross_entropy
    except (kernels.BackendUnavailable, ValueError) as e:
        rows.append({"what": "cross_entropy", "provider": "cuda backend (C++ CPU)", "status": "unavailable", "reason": str(e)})
    for name, fn in fns.items():
        call = (lambda fn=fn: fn(logits, targets)) if name == "F.cross_entropy" else (lambda fn=fn: fn(logits, targets, -1, 50257))

        def fwd_bwd(call=call):
            call().backward()
            logits.grad = None
        for mode, stmt in (("fwd", call), ("fwd+bwd", fwd_bwd)):
            what = f"cross_entropy N={N} V={V} fp32 {mode}"
            try:
                m = tb.Timer(stmt="stmt()", globals={"stmt": stmt}).blocked_autorange(min_run_time=0.3 if args.quick else 1.0)
                rows.append({"what": what, "provider": name, "status": "ok", "ms": m.median * 1e3,
                             "ms_p20": 1e3 * _q(m.times, 0.2), "ms_p80": 1e3 * _q(m.times, 0.8)})
            except Exception as e:
                rows.append({"what": what, "provider": name, "status": "error", "reason": f"{type(e).__name__}: {e}"})
    # 2. Data loader throughput.
    try:
        from gpt2 import data as gdata

        B, T = 16, 256
        loader = gdata.make_loader(args.data, "train", B, T)
        loader.next_batch()  # tokenizes (cached) the text
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < (0.5 if args.quick else 2.0):
            loader.next_batch()
            n += 1
        rows.append({"what": f"data loader {args.data} B={B} T={T}", "provider": "gpt2.data", "status": "ok",
                     "tokens_per_sec": n * B * T / (time.perf_counter() - t0)})
    except Exception as e:
        rows.append({"what": "data loader", "provider": "gpt2.data", "status": "error", "reason": f"{type(e).__name__}: {e}"})
    # 3. Trainer tokens/sec, tiny model, torch backend.
    ns = argparse.Namespace(e2e_batch=4, e2e_seq=128, e2e_steps=3 if args.quick else 12, e2e_warmup=1 if args.quick else 2,
                            e2e_timeout=args.e2e_timeout, data=args.data)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = train_run("torch", (), ns, Path(d) / "tiny", model="tiny")
    rows.append({"what": f"gpt2.train tiny B=4 T=128 {ns.e2e_steps} steps (first {ns.e2e_warmup} excluded)", "provider": "torch", **r})
    # 4. Decode throughput with the KV cache (tiny and 124M, random weights).
    for d in decode_rows("cpu", args.quick):
        what = f"decode {d['model']} B={d.get('batch', '-')} {d.get('new_tokens', '-')} new tokens (KV cache)"
        extra = {"tokens_per_sec": d["tokens_per_sec"]} if d["status"] == "ok" else {"reason": d["reason"]}
        rows.append({"what": what, "provider": "gpt2.generate", "status": d["status"], **extra})

    # 5. Host time of our ops' Python wrappers (Triton launches stubbed): what makes eager training
    #    host-bound on a GPU (bench/host_overhead.py). A subprocess: it replaces the kernels by stubs.
    cmd = [sys.executable, "-m", "bench.host_overhead", "--json", "--number", "50" if args.quick else "300"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0:
        for r in json.loads(proc.stdout)["rows"]:
            for path in (p for p in ("fast_path", "custom_op", "torch_backend") if r[p] is not None):
                rows.append({"what": f"host time {r['op']} fwd+bwd (launches stubbed)", "provider": path, "status": "ok",
                             "host_us": r[path]["us"]})
    else:
        rows.append({"what": "host time (bench.host_overhead)", "provider": "-", "status": "error",
                     "reason": (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]})

    print("| what | provider | result |\n|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            res = f"{r['status']}: {report._short(r.get('reason'), 160)}"
        elif "host_us" in r:
            res = f"{r['host_us']:.1f} us of host time per call"
        elif "ms" in r:
            res = f"{r['ms']:.3f} ms [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}]"
        else:
            res = f"{r['tokens_per_sec']:,.0f} tokens/s" + (f", loss {r['loss']:.3f}" if "loss" in r else "")
        print(f"| {r['what']} | {r['provider']} | {res} |")
    doc = {"schema": report.SCHEMA, "kind": "cpu", "env": env, "rows": [], "cpu": rows, "torch_threads": torch.get_num_threads()}
    if args.out:
        print(f"\nwrote {write_doc(doc, args.out, 'cpu')}")
    return 0


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- CLI ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("ops", nargs="*", help=f"ops to time (default all): {', '.join(sorted({b.op for b in specs.BENCHES}))}")
    a("--ops", dest="ops_opt", default=None, help="comma-separated ops (same as the positional list)")
    a("--quick", action="store_true", help="one shape per op, shorter repetitions; with --e2e: the eager headline runs, "
      "without and with --cuda-graph")
    a("--rep", type=int, default=None, help="do_bench repetition time in ms (default 100, --quick 50); "
      "also the time spent replaying each CUDA graph")
    a("--no-graphs", action="store_true", help="skip the CUDA-graph (device-only) timings")
    a("--out", default=None, help="results folder (default bench/results/ for GPU runs; static/cpu write only with --out)")
    a("--static", action="store_true", help="no GPU needed: AOT compile report, IO audit, floors; exit 1 on spills")
    a("--cpu", action="store_true", help="the CPU mode (default when no GPU is visible)")
    a("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two results; exit 1 if anything is >5%% slower")
    a("--e2e", action="store_true", help="end-to-end gpt2.train runs instead of kernel timings")
    a("--e2e-steps", type=int, default=15, help="optimizer steps per e2e run (default 15: ~1 s of steps on an H100)")
    a("--e2e-warmup", type=int, default=5, help="first steps excluded (compile, autotune, allocator warm-up, "
      "CUDA-graph capture)")
    a("--e2e-filter", default=None, help="regex on the run name (the spec and its trainer flags), e.g. '^triton', "
      "'compile' or 'cuda-graph|reduce-overhead'")
    a("--e2e-profile", type=int, default=2, metavar="N",
      help="after the timed steps, N more under the profiler (gpt2.train --profile): device time per kernel "
           "category and the GPU's idle share per run, in the JSON and the table (0: off)")
    a("--e2e-batch", type=int, default=16, help="micro-batch; total batch = B * T (one micro-step per step)")
    a("--e2e-seq", type=int, default=1024)
    a("--e2e-timeout", type=int, default=300, help="seconds per training run")
    a("--data", default=None, help="training text/shards for --e2e and the CPU mode (default: tiny Shakespeare)")
    args = p.parse_args(argv)
    ops = list(args.ops) + (args.ops_opt.split(",") if args.ops_opt else [])
    known = {b.op for b in specs.BENCHES}
    bad = [o for o in ops if o not in known]
    if bad:
        p.error(f"unknown op(s) {bad}; known: {', '.join(sorted(known))}")
    args.ops = set(ops) or None
    args.rep = args.rep or (50 if args.quick else 100)
    if args.data is None:
        args.data = "shakespeare"
    if args.e2e_warmup >= args.e2e_steps:
        p.error("--e2e-warmup must be smaller than --e2e-steps")
    if args.e2e_profile < 0:
        p.error(f"--e2e-profile must be >= 0, got {args.e2e_profile}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare:
        try:
            a, b = (report.load(path) for path in args.compare)
        except (OSError, ValueError) as e:  # a missing file, not JSON, not a bench result
            print(f"error: {e}", file=sys.stderr)
            return 2
        text, flagged = report.compare(a, b)
        print(text)
        return 1 if flagged else 0
    if args.static:
        return run_static(args)
    import torch

    if args.e2e:
        return run_e2e(args)
    if args.cpu or not torch.cuda.is_available():
        return run_cpu(args)
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
