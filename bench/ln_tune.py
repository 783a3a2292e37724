"""Tuner for kernels/layernorm.py on a GPU: sweeps the launch configs of the forward and backward kernels.

    python bench/ln_tune.py [--out DIR] [--rows 16384,65536] [--C 768] [--quick]
    python -m kernels._triton_utils 80,90 bench.ln_tune      # (no GPU) registers/spills of every candidate

Why: on an H100 LayerNorm fwd+bwd (16384 x 768 bf16) ran at 43% of copy bandwidth, the backward at 3x its
floor (74 us for 75.6 MB). Its loop over row tiles is serial and unpipelined, at 128 registers x 8 warps
(2 programs per SM). Candidates: rows per tile and warps (forward and backward); programs per SM and
`tl.range(num_stages=)` software pipelining of the backward's tile loop (stages >= 2 compile to cp.async
prefetches into shared memory with the registers unchanged; see the static report).
Prediction: stages 2-3 bring the backward near the forward's bandwidth (~75% of copy), ~35 us.
Also swept: fp32 rows (--fp32-rows; under bf16 autocast the residual stream is fp32, and the model has y
written in bf16: so does the sweep) and add_layer_norm as
the model's ln_2 runs it (--add-rows: fp32 stream + bf16 residual; its backward with the residual gradient
uses 148 registers on sm_90 at the default config).

Timing: device only, CUDA-graph replay of 20 calls rotating through 4 input copies (so inputs of 25 MB do not
sit in the 50 MB L2 between calls), median of 5 replays, CUDA events. Every candidate's outputs are checked
against kernels.reference in float64 terms (dx, dw, db within 2x the default config's error + 1e-6).
The op's fixed launch is kernels/layernorm.py's _tile() / BWD_PROGRAMS_PER_SM / BWD_STAGES (the baseline here:
the sweep turns the op's autotuning off); on a GPU, inputs of >= ln.AUTOTUNE_MIN_ELEMENTS are autotuned among
ln.FWD_TUNE / ln.BWD_TUNE. A sweep is how to choose those tables.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FWD = [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]  # (rows per tile, warps)
# (rows per tile, warps, pipelining stages, programs per SM). Registers on sm_90 (static report, fp32 rows,
# stages 1): R=4 w8 124-148 (2 programs of 8 warps per SM at most), R=2 w8 80 and R=4 w16 97 (more warps
# resident: fewer elements per thread).
BWD = [(br, w, stages, per_sm) for br, w in ((1, 2), (2, 4), (2, 8), (4, 8), (4, 16), (8, 8)) for stages in (1, 2, 3)
       for per_sm in (2, 4, 8)]
QUICK_BWD = [(4, 8, s, p) for s in (1, 2, 3) for p in (2, 4)] + [(2, 4, 2, 8), (1, 2, 2, 8), (2, 8, 1, 4), (2, 8, 2, 4),
                                                                  (4, 16, 1, 2), (4, 16, 2, 2)]
SETS, CALLS = 4, 20


def compile_specs(C=768):
    """Every candidate as an AotSpec (bf16 and fp32 rows, fp32 weights as under autocast), for the static report."""
    from kernels import layernorm as ln
    from kernels._triton_utils import AotSpec

    if C != 768:
        raise ValueError("compile_specs: the candidates are compiled at GPT-2's C = 768")
    specs = []
    for x in ("bf16", "fp32"):
        # as the sweep runs them: bf16 rows -> bf16 y; fp32 rows -> bf16 y (the model's out_dtype)
        model = (f"x={x} w=fp32",) if x == "bf16" else ("x=fp32 y=bf16 w=fp32", "x=fp32 dy=bf16 w=fp32")
        base = {s.name.split(" ")[0]: s for s in ln.compile_specs() if s.name.startswith("layer_norm")
                and any(m in s.name for m in model)}
        for br, w in FWD:
            s = base["layer_norm_fwd"]
            specs.append(AotSpec(f"ln_fwd x={x} C={C} R={br} w{w}", s.fn, s.signature,
                                 {**s.constexprs, "BLOCK_R": br}, s.aligned, num_warps=w))
        for br, w, stages in sorted({c[:3] for c in BWD}):
            s = base["layer_norm_bwd"]
            specs.append(AotSpec(f"ln_bwd x={x} C={C} R={br} w{w} stages={stages}", s.fn, s.signature,
                                 {**s.constexprs, "BLOCK_R": br, "STAGES": stages}, s.aligned, num_warps=w))
    return specs


def graph_ms(calls, torch, n=CALLS):
    """Median ms per call of `calls` (a list of thunks, launched round-robin, n launches in all) replayed
    from one CUDA graph: 5 replays timed with CUDA events. bench/ce_tune.py uses it too."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for i in range(n):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / n)
    return statistics.median(times)


def sweep(N, C, fwd_cfgs, bwd_cfgs, copy_gbps, say, device="cuda", timer=None, dtype=None, add=False):
    """Rows of timings for every config. `timer(calls) -> ms` defaults to CUDA-graph replay; the tests run
    the same sweep on CPU tensors in Triton's interpreter with a stand-in timer (checks only).
    add=True sweeps add_layer_norm as the model runs it: fp32 rows x (dtype ignored) + a bf16 residual,
    forward storing s = x + r, backward adding the residual gradient ds. fp32 rows (and add) write y and
    read dy in bf16, as the model under bf16 autocast does (out_dtype)."""
    import torch

    from kernels import layernorm as ln
    from kernels import reference as ref

    dev, sw = device, 4
    if add:
        dtype = torch.float32
    elif dtype is None:  # bf16 on a GPU; fp32 in the interpreter, which casts to bf16 by truncation
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    y_dtype = torch.bfloat16 if dtype == torch.float32 else dtype  # the model's out_dtype under autocast
    s, sy = torch.finfo(dtype).bits // 8, torch.finfo(y_dtype).bits // 8
    dtype_name = str(dtype).split(".")[-1] + ("+bf16 residual" if add else "") + (" bf16 y" if sy != s else "")
    timer = timer or (lambda calls: graph_ms(calls, torch))

    def randn(dt=dtype):
        return torch.randn(N, C, device=dev).to(dt)

    sets = []  # x, r, w, b, dy, ds (r and ds only with add)
    for i in range(SETS):
        w, b = 1 + 0.1 * torch.randn(C, device=dev), 0.1 * torch.randn(C, device=dev)
        sets.append((randn(), randn(torch.bfloat16) if add else None, w, b, randn(y_dtype), randn() if add else None))
    x, r, w, b, dy, ds = sets[0]
    # float64 truth and the default config's error, for the checks
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    x64, w64, b64 = leaves
    s64 = x64 + r.double() if add else x64
    y64 = ref.layer_norm(s64, w64, b64)
    torch.autograd.backward((y64, s64) if add else y64, (dy.double(), ds.double()) if add else dy.double())
    truth = {"y": y64.detach(), "dx": x64.grad, "dw": w64.grad, "db": b64.grad}
    if add:
        truth["s"], truth["dr"] = s64.detach(), x64.grad  # the residual's gradient is x's, in bf16
        s_, y, mean, rstd = ln.add_layer_norm_fwd(x, r, w, b, 1e-5, y_dtype)
        dx, dr, (dw, db) = ln.add_layer_norm_bwd(dy, s_, w, mean, rstd, ds, torch.bfloat16)
        default = {"s": s_, "y": y, "dx": dx, "dr": dr, "dw": dw, "db": db}
    else:
        y, mean, rstd = ln.layer_norm_fwd(x, w, b, 1e-5, y_dtype)
        dx, (dw, db) = ln.layer_norm_bwd(dy, x, w, mean, rstd)
        default = {"y": y, "dx": dx, "dw": dw, "db": db}
    default_err = {k: (v.double() - truth[k]).abs().max().item() for k, v in default.items()}
    block_c = 1 << (C - 1).bit_length()
    bucket = 1 << (N - 1).bit_length()  # the kernels' ROWS_BUCKET argument (an autotune key; unused here)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev == "cuda" else 1
    rows = []

    def check(got):
        err = {k: (v.double() - truth[k]).abs().max().item() for k, v in got.items()}
        bad = [k for k in err if not (err[k] <= 2 * default_err[k] + 1e-6)]  # NaN fails too
        return err, bad

    fwd_bytes = N * C * (s + sy) + 2 * C * sw + 8 * N + (N * C * (2 + s) if add else 0)  # + read r, write s
    for br, warps in fwd_cfgs:
        outs = [(torch.empty_like(x), torch.empty_like(x, dtype=y_dtype), torch.empty(N, device=dev),
                 torch.empty(N, device=dev)) for _ in sets]

        def launch_fwd(i, br=br, warps=warps):
            xi, ri, wi, bi, _, _ = sets[i]
            si, yi, mi, rsi = outs[i]
            ln._layer_norm_fwd_kernel[(-(-N // br),)](xi, ri if add else xi, si, wi, bi, yi, mi, rsi, C, C, N, C,
                                                       1e-5, bucket, BLOCK_R=br, BLOCK_C=block_c, HAS_RESIDUAL=add,
                                                       num_warps=warps)
        row = {"kernel": "fwd", "dtype": dtype_name, "N": N, "C": C, "block_r": br, "warps": warps}
        try:
            ms = timer([lambda i=i: launch_fwd(i) for i in range(SETS)])
            got = {"y": outs[0][1], **({"s": outs[0][0]} if add else {})}
            err, bad = check(got)
            row.update(ms=ms, gbps=fwd_bytes / ms / 1e6, pct_copy=100 * fwd_bytes / ms / 1e6 / copy_gbps,
                       max_err=err, bad=bad, default=(br, block_c, warps) == ln._tile(C))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        say(row)

    bwd_bytes = N * C * (2 * s + sy) + 8 * N + 3 * C * sw + (N * C * (s + 2) if add else 0)  # + read ds, write dr
    stats = []  # per input set: (the LayerNorm's input: s or x, mean, rstd)
    for xi, ri, wi, bi, _, _ in sets:
        if add:
            si, _, mi, rsi = ln.add_layer_norm_fwd(xi, ri, wi, bi, 1e-5, y_dtype)
        else:
            si, (_, mi, rsi) = xi, ln.layer_norm_fwd(xi, wi, bi, 1e-5)
        stats.append((si, mi, rsi))
    for br, warps, stages, per_sm in bwd_cfgs:
        programs = ln._bwd_programs(-(-N // br), per_sm * sms)
        outs = [(torch.empty_like(x), torch.empty(programs, 2, C, device=dev),
                 torch.empty_like(x, dtype=torch.bfloat16) if add else None) for _ in sets]

        def launch_bwd(i, br=br, warps=warps, stages=stages, per_sm=per_sm, programs=programs):
            _, _, wi, _, dyi, dsi = sets[i]
            xi, mi, ri = stats[i]
            dxi, parts, dri = outs[i]
            ln._layer_norm_bwd_kernel[(programs,)](dyi, xi, wi, mi, ri, dxi, dsi if add else dyi,
                                                   dri if add else dxi, parts,
                                                   C, C, C, N, C, bucket, BLOCK_R=br, BLOCK_C=block_c, STAGES=stages,
                                                   PER_SM=per_sm, HAS_DS=add, HAS_DR=add, num_warps=warps)
            parts.sum(0)  # the op's reduction of the partial sums (a torch kernel), timed with it
        row = {"kernel": "bwd", "dtype": dtype_name, "N": N, "C": C, "block_r": br, "warps": warps, "stages": stages,
               "programs_per_sm": per_sm, "programs": programs}
        try:
            ms = timer([lambda i=i: launch_bwd(i) for i in range(SETS)])
            dxi, parts, dri = outs[0]
            sums = parts.sum(0)
            err, bad = check({"dx": dxi, "dw": sums[0], "db": sums[1], **({"dr": dri} if add else {})})
            default = (br, block_c, warps) == ln._tile(C) and stages == ln.BWD_STAGES and per_sm == ln.BWD_PROGRAMS_PER_SM
            row.update(ms=ms, gbps=bwd_bytes / ms / 1e6, pct_copy=100 * bwd_bytes / ms / 1e6 / copy_gbps,
                       max_err=err, bad=bad, default=default)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        say(row)
    return rows


def _fmt(r):
    if "error" in r:
        return f"{r['kernel']} {r['dtype']} N={r['N']} R={r['block_r']} w{r['warps']} {r.get('stages', '')}: ERROR {r['error']}"
    cfg = f"R={r['block_r']} w{r['warps']}" + (f" stages={r['stages']} {r['programs_per_sm']}/SM" if r["kernel"] == "bwd" else "")
    flag = (" [default]" if r["default"] else "") + (f" WRONG {r['bad']}" if r["bad"] else "")
    return f"{r['kernel']} {r['dtype']} N={r['N']} C={r['C']} {cfg:28s} {1e3 * r['ms']:8.1f} us {r['gbps']:7.0f} GB/s {r['pct_copy']:5.1f}%{flag}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/ln_tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for ln_tune.json and ln_tune.log")
    p.add_argument("--rows", default="16384,65536", help="comma-separated row counts (B*T)")
    p.add_argument("--C", type=int, default=768)
    p.add_argument("--quick", action="store_true", help="fewer backward candidates")
    p.add_argument("--fp32-rows", default="16384", help="row counts also swept with fp32 rows and weights (the "
                   "residual stream under autocast); '' for none")
    p.add_argument("--add-rows", default="16384", help="row counts swept for add_layer_norm (fp32 stream + bf16 "
                   "residual, the model's ln_2); '' for none")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/ln_tune.py needs a CUDA GPU; without one: python -m kernels._triton_utils 80,90 bench.ln_tune")
        return 2
    try:
        rows_list = [int(n) for n in args.rows.split(",")]
        fp32_rows = [int(n) for n in args.fp32_rows.split(",") if n.strip()]
        add_rows = [int(n) for n in args.add_rows.split(",") if n.strip()]
    except ValueError:
        p.error("--rows, --fp32-rows and --add-rows must be comma-separated integers")
    if any(n < 1 for n in rows_list + fp32_rows + add_rows) or args.C < 1:
        p.error("--rows and --C must be >= 1")
    from bench.run import measure_limits
    from kernels import layernorm as ln

    ln.AUTOTUNE = False  # the checks' baseline ("default") is the op's fixed launch
    limits = measure_limits(quick=True)
    log = []

    def say(row):
        line = _fmt(row)
        log.append(line)
        print(line, flush=True)

    print(f"# {torch.cuda.get_device_name()}: copy {limits['copy_gbps']:.0f} GB/s", flush=True)
    rows = []
    bwd = QUICK_BWD if args.quick else BWD
    for N in rows_list:
        rows += sweep(N, args.C, FWD, bwd, limits["copy_gbps"], say, dtype=torch.bfloat16)
    for N in fp32_rows:
        rows += sweep(N, args.C, FWD, bwd, limits["copy_gbps"], say, dtype=torch.float32)
    for N in add_rows:
        rows += sweep(N, args.C, FWD, bwd, limits["copy_gbps"], say, add=True)
    best = {}
    for r in rows:
        if "error" not in r and not r["bad"]:
            key = (r["kernel"], r["dtype"], r["N"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    print("\n# fastest correct config per kernel and shape")
    for r in best.values():
        print(_fmt(r))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "limits": limits,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
        with open(os.path.join(args.out, "ln_tune.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(args.out, "ln_tune.log"), "w") as f:
            f.write("\n".join(log) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
