"""Tuner for kernels/attention.py on a GPU: sweeps launch configs of each kernel, and a fused dK/dV + dQ
backward variant, next to SDPA (flash, cuDNN) timed in the same process.

    python bench/attn_tune.py --out DIR                  # op timings (3 shapes) + the config sweep at 16x1024
    python bench/attn_tune.py --out DIR --only none --overhead   # op timings + CPU-overhead diagnostics
    python -m kernels._triton_utils 80,90 bench.attn_tune   # (no GPU) spills of every candidate, JSON

Candidates are precompiled in parallel worker processes (they fill Triton's disk cache), then timed here
with triton.testing.do_bench medians; each backward candidate's gradients are checked against an fp32 math
reference (error <= 2x sdpa_flash's bf16 error + 1e-2). Full log: DIR/attn_tune.log. Scratch tool: the
kernels' autotune lists (kernels/attention.py) are what the op uses.
"""
import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels.attention as A  # noqa: E402

H, D = 12, 64
LOG2E = 1.4426950408889634


# ---- variant: one backward kernel, dK/dV of key tile i then dQ of query tile i (equal work per program) --

@triton.jit
def _bwd_fused_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, T, T_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = DELTA + bh.to(tl.int64) * T
    # dK, dV of key tile pid
    offs_n = pid * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    offs_m = tl.arange(0, BLOCK_M1)
    n_ok = offs_n < T
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=n_ok[:, None], other=0.0)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    diag = pid * BLOCK_N1
    dk, dv = A._dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                           diag, tl.minimum(diag + BLOCK_N1, T), offs_n, T, qk_scale, BLOCK_M1, True, DOT_PREC)
    dk, dv = A._dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                           diag + BLOCK_N1, T, offs_n, T, qk_scale, BLOCK_M1, False, DOT_PREC)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None])
    # dQ of query tile pid (BLOCK_N1 rows)
    offs_m2 = pid * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    offs_n2 = tl.arange(0, BLOCK_N2)
    m_ok = offs_m2 < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m2[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m2[:, None] * stride_dot + offs_d[None, :],
                 mask=m_ok[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + offs_m2, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + offs_m2, mask=m_ok, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n2[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n2[:, None] * stride_vt + offs_d[None, :]
    dq = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dq = A._dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, diag,
                     offs_m2, offs_n2, T, qk_scale, BLOCK_N2, False, DOT_PREC)
    dq = A._dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, diag,
                     tl.minimum(diag + BLOCK_N1, T), offs_m2, offs_n2, T, qk_scale, BLOCK_N2, True, DOT_PREC)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m2[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])


# ---- candidates: (kind, BLOCK_M, BLOCK_N, warps, stages); fused: BLOCK_M = dK/dV query step, BLOCK_N = key tile
#      (= dQ query tile), and the dQ key step is given as a 6th entry

def candidates():
    c = []
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 4),
                         (128, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 2), (64, 32, 4, 4)]:
        c.append(("fwd", bm, bn, w, s))
    for bm, bn, w, s in [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3),
                         (32, 128, 4, 3), (32, 128, 4, 4), (32, 128, 4, 5), (32, 128, 8, 2), (32, 128, 8, 4),
                         (32, 128, 8, 5), (64, 128, 8, 2), (64, 128, 8, 4), (64, 128, 4, 2), (64, 128, 4, 3),
                         (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (32, 64, 4, 4), (32, 64, 4, 5),
                         (16, 128, 4, 4), (16, 64, 4, 4), (128, 128, 8, 2)]:
        c.append(("dkdv", bm, bn, w, s))
    for bm, bn, w, s in [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                         (128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 4, 5), (128, 32, 8, 2), (128, 32, 8, 4),
                         (128, 32, 8, 5), (128, 64, 8, 2), (128, 64, 8, 4), (128, 64, 4, 2), (64, 64, 4, 4),
                         (64, 32, 4, 3), (64, 32, 4, 4), (64, 64, 8, 3), (128, 16, 4, 4), (64, 16, 4, 4),
                         (128, 128, 8, 2)]:
        c.append(("dq", bm, bn, w, s))
    for bm1, bn1, bn2, w, s in [(32, 128, 32, 4, 3), (32, 128, 32, 4, 4), (32, 128, 32, 4, 5),
                                (32, 128, 32, 8, 3), (32, 128, 32, 8, 4), (64, 128, 64, 8, 2),
                                (64, 128, 64, 8, 3), (32, 128, 64, 8, 3), (64, 128, 32, 8, 3),
                                (32, 64, 32, 4, 3), (32, 64, 32, 4, 4), (64, 64, 64, 4, 3), (16, 128, 16, 4, 4)]:
        c.append(("fused", bm1, bn1, w, s, bn2))
    return c


def compile_specs():
    """AOT specs of every candidate (static_report(["bench.attn_tune"])): spills on sm_80 / sm_90."""
    base = {s.name.split(" ")[0]: s for s in A.compile_specs()}
    out = []
    for c in candidates():
        kind, bm, bn, w, s = c[:5]
        if kind == "fused":
            src = base["attention_bwd_dkdv"]
            sig = {}
            for n in src.signature:
                if n == "DK":
                    sig.update(DQ="*bf16", DK="*bf16", DV="*bf16")
                elif n == "DV":
                    continue
                elif n == "stride_dkb":
                    sig.update(stride_dqb="i32", stride_dqh="i32", stride_dqt="i32", stride_dkb="i32")
                elif n in ("BLOCK_M", "BLOCK_N"):
                    continue
                elif n == "DOT_PREC":
                    sig.update(BLOCK_M1="constexpr", BLOCK_N1="constexpr", BLOCK_N2="constexpr", DOT_PREC="constexpr")
                else:
                    sig[n] = src.signature[n]
            aligned = tuple(n for n, t in sig.items() if n != "H" and t not in ("fp32", "constexpr"))
            out.append(A.AotSpec(name=str(c), fn=_bwd_fused_kernel, signature=sig,
                                 constexprs={"HEAD_DIM": 64, "BLOCK_M1": bm, "BLOCK_N1": bn, "BLOCK_N2": c[5],
                                             "DOT_PREC": "tf32"}, aligned=aligned, num_warps=w, num_stages=s))
        else:
            src = base["attention_" + {"fwd": "fwd", "dkdv": "bwd_dkdv", "dq": "bwd_dq"}[kind]]
            out.append(A.AotSpec(name=str(c), fn=src.fn, signature=src.signature,
                                 constexprs={**src.constexprs, "BLOCK_M": bm, "BLOCK_N": bn}, aligned=src.aligned,
                                 num_warps=w, num_stages=s))
    return out


def make(B, T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4))
    return q, k, v, do


def launcher(cand, q, k, v, do, o, lse, delta, dq, dk, dv):
    """A no-argument callable that launches the candidate once."""
    kind, bm, bn, w, s = cand[:5]
    B, _, T, _ = q.shape
    st = A._strides
    scales = (triton.next_power_of_2(T), 1.0 / math.sqrt(D), LOG2E / math.sqrt(D))
    common = (*st(q), *st(k), *st(v), *st(do))
    kw = dict(HEAD_DIM=D, DOT_PREC="tf32", num_warps=w, num_stages=s)
    if kind == "fwd":
        args = (q, k, v, o, lse, *st(q), *st(k), *st(v), *st(o), H, T, triton.next_power_of_2(T), LOG2E / math.sqrt(D))
        return lambda: A._attn_fwd.fn[(triton.cdiv(T, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, **kw)
    if kind == "dkdv":
        args = (q, k, v, do, dk, dv, lse, delta, *common, *st(dk), *st(dv), H, T, *scales)
        return lambda: A._attn_bwd_dkdv.fn[(triton.cdiv(T, bn), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, **kw)
    if kind == "dq":
        args = (q, k, v, do, dq, lse, delta, *common, *st(dq), H, T, *scales)
        return lambda: A._attn_bwd_dq.fn[(triton.cdiv(T, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, **kw)
    args = (q, k, v, do, dq, dk, dv, lse, delta, *common, *st(dq), *st(dk), *st(dv), H, T, *scales)
    return lambda: _bwd_fused_kernel[(triton.cdiv(T, bn), B * H)](*args, BLOCK_M1=bm, BLOCK_N1=bn,
                                                                  BLOCK_N2=cand[5], **kw)


def buffers(B, T, real=True):
    q, k, v, do = make(B, T)
    if real:
        o, lse = A.attention_fwd(q, k, v)
    else:
        o, lse = torch.randn_like(q), torch.randn(B, H, T, device="cuda") + 5
    delta = (o.float() * do.float()).sum(-1).contiguous()
    return q, k, v, do, o.clone(), lse.clone(), delta, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def precompile(cands, T):
    """Worker: compile (by running once at B=1: same specializations as any B) every candidate."""
    bufs = buffers(1, T, real=False)
    out = []
    for c in cands:
        t0 = time.time()
        try:
            launcher(c, *bufs)()
            torch.cuda.synchronize()
            out.append((c, None, time.time() - t0))
        except Exception as e:  # out of resources etc.: reported
            out.append((c, f"{type(e).__name__}: {str(e)[:200]}", time.time() - t0))
    return out


def sdpa_fns(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    def f(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return f


def bench_op(fn, q, k, v, do):
    """(fwd ms, bwd ms, fwd+bwd ms) of an autograd attention fn, do_bench medians."""
    from triton.testing import do_bench

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do)
    fwd = do_bench(lambda: fn(*leaves), warmup=25, rep=100, return_mode="median")
    both = do_bench(lambda: fn(*leaves).backward(do), warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    out = fn(*leaves)
    bwd = do_bench(lambda: out.backward(do, retain_graph=True), warmup=25, rep=100, grad_to_none=leaves,
                   return_mode="median")
    return fwd, bwd, both


def tflops(B, T, ms, mult):
    return mult * 2 * 2 * B * H * T * T * D / 2 / ms / 1e9


def op_timings(shapes, providers, say):
    lines = []
    for shape in shapes:
        b2, t2 = (int(x) for x in shape.split("x"))
        q, k, v, do = make(b2, t2, seed=1)
        for name, fn in providers:
            try:
                f, bw, both = bench_op(fn, q, k, v, do)
                lines.append(f"B={b2} T={t2} {name:11s} fwd {f:.3f} ({tflops(b2, t2, f, 1):.0f}) "
                             f"bwd {bw:.3f} ({tflops(b2, t2, bw, 2.5):.0f}) "
                             f"fwd+bwd {both:.3f} ({tflops(b2, t2, both, 3.5):.0f})")
            except Exception as e:
                lines.append(f"B={b2} T={t2} {name}: {type(e).__name__}: {str(e)[:150]}")
            say(lines[-1])
    return lines


def overhead(say, out_dir):
    """CPU cost per call at a tiny shape (GPU work negligible): where the op's time goes besides the kernels."""
    import cProfile
    import io
    import pstats

    q, k, v, do = make(1, 128, seed=2)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o, lse = A.attention_fwd(q, k, v)
    raw_fwd, raw_bwd = A.attention_fwd._init_fn, A.attention_bwd._init_fn

    class Raw(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            o, lse = raw_fwd(q, k, v)
            ctx.save_for_backward(q, k, v, o, lse)
            return o

        @staticmethod
        def backward(ctx, do):
            return raw_bwd(do, *ctx.saved_tensors)

    flash, cudnn = sdpa_fns("FLASH_ATTENTION"), sdpa_fns("CUDNN_ATTENTION")
    cases = [
        ("attention() fwd", lambda: A.attention(*leaves)),
        ("attention() fwd+bwd", lambda: A.attention(*leaves).backward(do)),
        ("custom op fwd+bwd (attention_fwd[0])", lambda: A.attention_fwd(*leaves)[0].backward(do)),
        ("custom op attention_fwd, no grad", lambda: A.attention_fwd(q, k, v)),
        ("custom op attention_bwd", lambda: A.attention_bwd(do, q, k, v, o, lse)),
        ("python impl fwd (no dispatcher)", lambda: raw_fwd(q, k, v)),
        ("python impl bwd (no dispatcher)", lambda: raw_bwd(do, q, k, v, o, lse)),
        ("autograd.Function(impls) fwd+bwd", lambda: Raw.apply(*leaves).backward(do)),
        ("sdpa_flash fwd+bwd", lambda: flash(*leaves).backward(do)),
        ("sdpa_cudnn fwd+bwd", lambda: cudnn(*leaves).backward(do)),
        ("torch.empty_like x1", lambda: torch.empty_like(q)),
    ]
    say("== CPU us per call, B=1 H=12 T=128 D=64 (GPU idle most of the time) ==")
    for name, fn in cases:
        for _ in range(30):
            fn()
        torch.cuda.synchronize()
        n = 300
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        say(f"  {name:40s} {(time.perf_counter() - t0) / n * 1e6:8.1f} us")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        A.attention(*leaves).backward(do)
    torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
    with open(os.path.join(out_dir, "attn_profile.txt"), "w") as f:
        f.write(buf.getvalue())
    say("\n".join(buf.getvalue().splitlines()[:22]))
    return Raw


def gpu_split(say, Raw, B, T):
    """GPU-side: the op's bwd vs the same kernels without the dispatcher/autograd layers."""
    from triton.testing import do_bench

    q, k, v, do = make(B, T, seed=1)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o, lse = A.attention_fwd(q, k, v)
    raw_bwd = A.attention_bwd._init_fn
    res = {}
    for name, fn in (("attention()", A.attention), ("custom op", lambda *x: A.attention_fwd(*x)[0]),
                     ("Function(impls)", Raw.apply)):
        out = fn(*leaves)
        out.backward(do, retain_graph=True)
        res[name + " bwd"] = do_bench(lambda: out.backward(do, retain_graph=True), warmup=25, rep=100,
                                      grad_to_none=leaves, return_mode="median")
        res[name + " fwd+bwd"] = do_bench(lambda: fn(*leaves).backward(do), warmup=25, rep=100,
                                          grad_to_none=leaves, return_mode="median")
    res["impl bwd direct"] = do_bench(lambda: raw_bwd(do, q, k, v, o, lse), warmup=25, rep=100, return_mode="median")
    res["custom op bwd direct"] = do_bench(lambda: A.attention_bwd(do, q, k, v, o, lse), warmup=25, rep=100,
                                           return_mode="median")
    for kk, ms in res.items():
        say(f"  B={B} T={T} {kk:24s} {ms:.3f} ms")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            A.attention_fwd(*leaves)[0].backward(do)
        torch.cuda.synchronize()
    say(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--shapes", default="16x1024,8x2048,4x4096")
    p.add_argument("--sweep", default="16x1024", help="shape of the config sweep")
    p.add_argument("--overhead", action="store_true", help="CPU-overhead and op-vs-kernels diagnostics")
    p.add_argument("--only", default="", help="kinds to sweep: fwd,dkdv,dq,fused (default all; none: no sweep)")
    a = p.parse_args()
    log = open(os.path.join(a.out, "attn_tune.log"), "w")

    def say(*x):
        line = " ".join(str(y) for y in x)
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    B, T = (int(x) for x in a.sweep.split("x"))
    cands = [c for c in candidates() if not a.only or c[0] in a.only.split(",")]
    t0 = time.time()
    chunks = [cands[i::a.jobs] for i in range(a.jobs)] if cands else []
    import multiprocessing as mp
    with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
        results = [r for rs in pool.map(precompile, chunks, [T] * len(chunks)) for r in rs]
    failed = {c: e for c, e, _ in results if e}
    say(f"precompiled {len(cands)} candidates in {time.time() - t0:.0f}s, {len(failed)} failed")
    for c, e in failed.items():
        say("  FAILED", c, e)
    sdpa = [("sdpa_flash", sdpa_fns("FLASH_ATTENTION")), ("sdpa_cudnn", sdpa_fns("CUDNN_ATTENTION"))]
    say("== op timings (ms; TFLOP/s): kernels/attention.py (its autotune) and sdpa, same process ==")
    ours = [("triton", A.attention), ("triton_op", lambda *x: A.attention_fwd(*x)[0])]
    head = op_timings([x for x in a.shapes.split(",") if x], ours + sdpa, say)

    if a.overhead:
        try:
            gpu_split(say, overhead(say, a.out), B, T)
        except Exception as e:  # diagnostics only
            say(f"diagnostics failed: {type(e).__name__}: {e}")
    if not cands:
        for name, tuner in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
            for key, cfg in tuner.cache.items():
                say(f"autotuned {name} {key[:2]}: {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}")
        for line in head:
            say(line)
        return
    from triton.testing import do_bench
    bufs = buffers(B, T)
    q, k, v, do = bufs[:4]
    # fp32 math reference gradients, and sdpa_flash's bf16 error as the yardstick
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    sdpa_fns("MATH")(*leaves).backward(do.float())
    ref = [t.grad for t in leaves]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    sdpa_fns("FLASH_ATTENTION")(*leaves).backward(do)
    tol = [2 * (t.grad.float() - r).abs().max().item() + 1e-2 for t, r in zip(leaves, ref)]
    say("sdpa_flash err dq dk dv:", [f"{(x - 1e-2) / 2:.4f}" for x in tol])

    rows = {}
    for c in cands:
        if c in failed:
            continue
        bufs[7].zero_(), bufs[8].zero_(), bufs[9].zero_()
        fn = launcher(c, *bufs)
        fn()
        torch.cuda.synchronize()
        ok = ""
        if c[0] != "fwd":
            grads = {"dq": (bufs[7], ref[0], tol[0]), "dkdv": (bufs[8], ref[1], tol[1])}
            which = ["dq", "dkdv"] if c[0] == "fused" else [c[0]]
            for w in which:
                got, r, t = grads[w]
                err = (got.float() - r).abs().max().item()
                if not err <= t:
                    ok += f" BAD {w} err {err:.4f} > {t:.4f}"
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows[c] = ms
        say(f"{str(c):36s} {ms * 1e3:8.1f} us{ok}")

    def best(kind):
        kk = [c for c in rows if c[0] == kind]
        return min(kk, key=rows.get) if kk else None

    summary = ["", f"== sweep B={B} T={T}: best per kind (us) =="]
    for kind in ("fwd", "dkdv", "dq", "fused"):
        kk = sorted((c for c in rows if c[0] == kind), key=rows.get)[:4]
        summary.append(kind + ": " + " | ".join(f"{c[1:]} {rows[c] * 1e3:.1f}" for c in kk))
    if best("dkdv") and best("dq"):
        summary.append(f"separate dkdv+dq best: {(rows[best('dkdv')] + rows[best('dq')]) * 1e3:.1f} us; "
                       f"fused best: {rows[best('fused')] * 1e3 if best('fused') else float('nan'):.1f} us")

    for line in head + summary:
        say(line)


if __name__ == "__main__":
    main()
