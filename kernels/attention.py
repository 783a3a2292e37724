"""Causal self-attention in Triton with the FlashAttention-2 algorithm, as torch ops gpt2k::attention_fwd / _bwd,
and gpt2k::attention_qkv_fwd / _bwd, the same kernels straight from the model's (B, T, 3C) qkv projection.

What is fused (q, k, v: (B, H, T, D), causal, scale 1/sqrt(D); S = QK^T/sqrt(D), P = softmax(S + mask))
  forward   one program per (query tile of BLOCK_M rows, batch*head). It streams key/value tiles of BLOCK_N
            rows through an online softmax in fp32: running max m and sum l per row, the accumulator
            rescaled by exp2(m_old - m_new) when the max grows, divided by l once at the end. Scores are
            scaled by log2(e)/sqrt(D) so the exponentials are exp2. The (T, T) scores never reach memory;
            only the output and one fp32 log-sum-exp per row (LSE, natural log) are written.
  backward  recomputes P tile by tile from Q, K and the LSE (P = exp2(S*log2e - LSE*log2e)), FA2 style:
            1. preprocess: delta = rowsum(dO * O) (fp32, one value per query row);
            2. dK/dV kernel: one program per key tile; loops over the query tiles at or below the
               diagonal: dV += P^T dO, dS = P * (dO V^T - delta), dK += dS^T Q;
            3. dQ kernel: one program per query tile; loops over the key tiles up to the diagonal:
               dQ += dS K.
            Every output tile is owned by one program and summed in a fixed order: no atomics, the same
            inputs give bitwise the same gradients.
  Causal skipping: tiles entirely above the diagonal are never visited (loop bounds). Each loop runs in
  two stages: the tiles strictly below the diagonal without any mask, then the diagonal tiles with the
  causal mask (which also masks the keys past T). Hence BLOCK_M % BLOCK_N == 0 in the forward and the
  dQ kernel, BLOCK_N % BLOCK_M == 0 in the dK/dV kernel.
  Strides: q, k, v (and dO) are read through their strides, so the model's views of the fused qkv
  projection ((B, T, 3C).split + view + transpose) are not copied; only a tensor whose last dim is not
  contiguous is, or one whose rows would pass int32 offsets (T * stride_t + D >= 2^31: see _INT32_ROWS).
  Outputs (O, dQ, dK, dV) take the dimension order of their input (torch.empty_like): for the model that
  is (B, T, H, D) memory, so its transpose(1, 2).reshape(B, T, C) after attention is free.
  attention_qkv(qkv, n_head): q, k, v are views of qkv (B, T, 3C), y comes back as (B, T, C), and the
  backward writes dQ, dK, dV into their slices of one dqkv (B, T, 3C): no concatenation by autograd (a
  150 MB copy per layer at GPT-2's 16384 x 768 bf16, ~50 us on an H100) and no view nodes around the op.
  Grid: (query or key tiles, B*H); B*H over CUDA's gridDim.y limit (65535) is launched in chunks (MAX_GRID_Y).
  Dtypes: bf16 and fp16 take tensor-core dots with fp32 accumulation, P and dS are rounded to the input
  dtype before their dots (as FlashAttention does). fp32 is accepted and computed with exact fp32 dots
  (input_precision="ieee", no TF32) on the GPU and in the interpreter alike: a correctness path, slow on a
  GPU (FMA dots; the big tiles spill registers in fp32).

FLOPs (causal, counting only the unmasked half): forward 2 * 2 * B*H*T*T*D / 2 (QK^T and PV), backward
  2.5x that (dV, dP, dQ, dK and the recomputed QK^T). B=16, H=12, T=1024, D=64: fwd 25.8 GFLOP, bwd 64.4 GFLOP.
  This backward does 3.5x the forward's dot work, not 2.5x: the dQ kernel recomputes QK^T and dO V^T instead of
  accumulating dQ with atomics (the price of determinism; the benchmark counts the 2.5x, as FA2 does).
Bytes (floor, s bytes per element): forward reads q, k, v, writes o and the LSE: 4*B*H*T*D*s + 4*B*H*T;
  backward reads q, k, v, o, dO, LSE, writes dq, dk, dv (and delta): 8*B*H*T*D*s + 12*B*H*T.
  Forward intensity ~T/4 FLOPs per byte in bf16 (256 at T=1024): compute bound, unlike the other kernels.
  K/V tiles are re-read by every query tile of the same head, from L2.

Eager calls: attention() runs the two ops' own Python implementations under a torch.autograd.Function
  (kernels/_eager.py), not through the dispatcher (custom op -> autograd wrapper -> redispatch -> impl): same
  kernels, bitwise the same results, fewer layers. Under torch.compile it calls gpt2k::attention_fwd.
  Why it matters: at GPT-2 shapes the kernels are shorter than the CPU work around them. H100, B=16 H=12
  T=1024 D=64 bf16, do_bench medians in one process: kernels fwd 95 us, bwd 310 us (delta 21, dK/dV 190,
  dQ 99), but one fwd+bwd call (4 Triton launches, autograd) cost ~0.9-1.2 ms of CPU on that machine, so an
  isolated fwd+bwd measures CPU time: 0.55-1.08 ms this way, 0.85-1.37 ms via the dispatcher (backward alone
  0.31-0.58 vs 0.35-1.10 ms; noisy, CPU-bound). In a training step the CPU runs ahead and hides most of it.

Test: pytest tests/test_attention.py (interpreter on CPU, real kernel and bf16 on a GPU).
Benchmark: python bench/run.py (attention); static report: compile_specs() via kernels/_triton_utils.py.
  It also checks the tensor-core instructions in the PTX: on sm_90 every autotune config's dots compile to
  wgmma (Hopper's warpgroup MMA, e.g. 16 in the forward at 128 x 64 tiles, none left as mma.sync); only
  the small fallback tiles take Ampere's mma.sync there (the dK/dV 16 x 32, the dQ 32 x 16), which is
  allowed; on sm_80 everything is mma.sync. A config that lost wgmma fails the report.
On a GPU each kernel is autotuned (configs and prune function below) per (next power of two of T, D, dtype),
the choice cached on disk (Triton's cache_results: later processes on the machine reuse it, so a resumed run
computes with the same tiles, hence the same bits); in the interpreter each uses one fixed small config
(_INTERPRETER_CONFIG).
"""
import functools
import math

import torch
import triton
import triton.language as tl

from kernels import BackendUnavailable
from kernels._eager import (auxiliary_outputs, cdiv, check_devices, eager_function, fast_path, impl,
                            next_power_of_2, on_device)
from kernels._triton_utils import AotSpec
from kernels.reference import check_qkv

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634


# ---- kernels -------------------------------------------------------------------------------------

@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, offs_m, offs_n, T, qk_scale,
               BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over the key tiles [lo, hi). Without CAUSAL_MASK every key is < T and <= every query."""
    for start_n in range(lo, hi, BLOCK_N):
        if CAUSAL_MASK:
            kv_ok = (start_n + offs_n) < T
            k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N) fp32, unscaled
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= (start_n + offs_n)[None, :], s, float("-inf"))
        # The first tile of every row holds its key 0 or a key below the diagonal, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, T, D) inputs, any strides with a unit last-dim stride
    O,  # (B, H, T, D) output, q's dtype, unit last-dim stride
    LSE,  # (B, H, T) fp32, contiguous: log-sum-exp of each row's scaled scores (natural log)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T,
    T_BUCKET,  # next power of two >= T: only an autotune key
    qk_scale,  # log2(e) / sqrt(D)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step, divides BLOCK_M
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (ignored for 16-bit ones)
):
    # Heaviest tiles (most keys) first, so the short ones fill the tail of the launch.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    diag = start_m * BLOCK_M
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, diag,
                               offs_m, offs_n, T, qk_scale, BLOCK_N, False, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, diag,
                               tl.minimum(diag + BLOCK_M, T), offs_m, offs_n, T, qk_scale, BLOCK_N, True, DOT_PREC)

    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=m_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # (B, H, T, D) output and its gradient, unit last-dim stride
    DELTA,  # (B, H, T) fp32, contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=m_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=m_ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, lo, hi, offs_n, T,
                qk_scale, BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles [lo, hi). Transposed tiles: rows are keys."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        q = tl.load(q_ptrs + start_m * stride_qt, mask=m_ok[:, None], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dot, mask=m_ok[:, None], other=0.0)
        # Rows past T get LSE = +inf, hence P = 0: they add nothing.
        lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # (B, H, T, D) inputs and the output's gradient, unit last-dim stride
    DK, DV,  # (B, H, T, D) outputs, unit last-dim stride
    LSE, DELTA,  # (B, H, T) fp32, contiguous
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, T,
    T_BUCKET,  # autotune key only
    sm_scale,  # 1 / sqrt(D)
    qk_scale,  # log2(e) / sqrt(D)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per loop step, divides BLOCK_N
    BLOCK_N: tl.constexpr,  # key rows per program
    DOT_PREC: tl.constexpr,
):
    start_n = tl.program_id(0)  # low key tiles see the most queries: launched first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < T
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=n_ok[:, None], other=0.0)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = DELTA + bh.to(tl.int64) * T

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    diag = start_n * BLOCK_N
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                         diag, tl.minimum(diag + BLOCK_N, T), offs_n, T, qk_scale, BLOCK_M, True, DOT_PREC)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                         diag + BLOCK_N, T, offs_n, T, qk_scale, BLOCK_M, False, DOT_PREC)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, offs_m, offs_n, T, qk_scale,
              BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        if CAUSAL_MASK:
            kv_ok = (start_n + offs_n) < T
            k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= (start_n + offs_n)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # (B, H, T, D) inputs and the output's gradient, unit last-dim stride
    DQ,  # (B, H, T, D) output, unit last-dim stride
    LSE, DELTA,  # (B, H, T) fp32, contiguous
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T,
    T_BUCKET,  # autotune key only
    sm_scale,  # 1 / sqrt(D)
    qk_scale,  # log2(e) / sqrt(D)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step, divides BLOCK_M
    DOT_PREC: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=m_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    diag = start_m * BLOCK_M
    dq = _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, diag,
                   offs_m, offs_n, T, qk_scale, BLOCK_N, False, DOT_PREC)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, diag,
                   tl.minimum(diag + BLOCK_M, T), offs_m, offs_n, T, qk_scale, BLOCK_N, True, DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


# ---- launch configs ------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages). FA2 on Ampere/Hopper: big query tiles in the forward and dQ
# (the Q tile and the fp32 accumulator stay in registers), big key tiles in dK/dV; the streamed operand's
# tile small enough for 2-4 pipeline stages in shared memory.
# Every config here compiles for sm_80 and sm_90 without register spills at D=64 bf16 (tested); configs that
# spilled on either (e.g. forward 128x64 with 4 warps, dK/dV 32x128 with 4 warps) were dropped.
# Kernel medians on an H100 (B=16 H=12 T=1024 D=64 bf16, bench/attn_tune.py sweep of 63 configs, 2026-11-25):
# forward 64x64 w4 s3 96 us, 128x64 w8 s3 102 us; dK/dV 32x64 w4 s4 189 us, 16x64 w4 s4 191 us (32x128 w8 265 us);
# dQ 64x64 w4 s3 103 us, 64x32 w4 s3 106 us. 8 warps on 64-row tiles, and 2 stages, were the slow ones;
# dK/dV 64x64 w4 (208 us) spills on sm_80. A fused dK/dV + dQ kernel (tutorial 06 style, equal work per
# program) was slower: 322 us at best vs 292 us for the two kernels. Autotune picks at T = 1024 / 2048 / 4096:
# forward 64x64 w4 s3; dK/dV 16x64 w4 s4 (32x64 w4 s4 at 4096); dQ 64x64 w4 s3.
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 4)]
_DKDV_CONFIGS = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 4), (16, 64, 4, 4)]
_DQ_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 4), (128, 64, 8, 4)]
_PREPROCESS_BLOCK_M = 64
# Only where no table config fits this GPU's shared memory by the estimate below (never at GPT-2's bf16 D=64):
# fp32 at D=128 on an A100 (163 KiB per block; the smallest table forward tile, 64x64 s3, takes 180,480 B
# there and failed with OutOfResources), fp32 or 16-bit D=128 on 99 KiB GPUs (sm_86 / sm_89). Smaller
# streamed tiles, fewer stages; autotuned among themselves when several fit. test_attention.py compiles
# them for sm_80 in fp32 at D=128 (shared memory within the limit), and compile_specs() at GPT-2's shape.
_FALLBACK_CONFIGS = {"fwd": [(64, 32, 4, 3), (64, 32, 4, 2)], "dkdv": [(16, 32, 4, 2)],
                     "dq": [(64, 32, 4, 2), (32, 16, 4, 2)]}

# Without a GPU: one small config per kernel, uneven (BLOCK_M != BLOCK_N) so the interpreter exercises
# the diagonal stage with several steps, as the GPU configs do.
_INTERPRETER_CONFIG = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}

# Tiles streamed through shared memory per pipeline stage, and tiles held there once, in elements:
# the prune function's estimate of a config's shared memory (conservative; the compiler may use less).
_SMEM_TILES = {
    "fwd": lambda bm, bn, d, st: st * 2 * bn * d + bm * d,
    "dkdv": lambda bm, bn, d, st: st * 2 * bm * d + 2 * bn * d + bm * bn,
    "dq": lambda bm, bn, d, st: st * 2 * bn * d + 2 * bm * d + bm * bn,
}


def _configs(table):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


def _smem_bytes(kind, config, head_dim, elem):
    """The prune's shared-memory estimate of one config, bytes (conservative: sm_90 allocates it in full)."""
    return _SMEM_TILES[kind](config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], head_dim, config.num_stages) * elem


def _prune(kind):
    """early_config_prune for one kernel: drop configs whose estimated shared memory exceeds this GPU's
    per-block limit (when none of the table fits: the fallback configs that do), then tiles larger than
    T needs (the rows would be padding); when that leaves none (tiny T), the fitting config with the least
    shared memory. Never returns nothing, never a config over the limit: when even the fallbacks do not
    fit, raises BackendUnavailable."""
    fallback = _configs(_FALLBACK_CONFIGS[kind])

    def prune(configs, named_args, **kwargs):
        t_cap = max(16, named_args["T_BUCKET"])
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        q = named_args["Q"]
        props = torch.cuda.get_device_properties(q.device)
        limit = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
        smem = lambda c: _smem_bytes(kind, c, d, q.element_size())  # noqa: E731
        fitting = [c for c in configs if smem(c) <= limit] or [c for c in fallback if smem(c) <= limit]
        if not fitting:
            least = min(smem(c) for c in fallback)
            raise BackendUnavailable(
                f"attention (triton): no {kind} kernel config fits this GPU's shared memory for {q.dtype} at "
                f"D = {d}: the smallest needs ~{least} B, the limit per block is {limit} B; use float16 / "
                "bfloat16 or a smaller head dim")
        kept = [c for c in fitting if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= t_cap]
        return kept or [min(fitting, key=lambda c: (smem(c), c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]))]

    return prune


def _autotuned(kernel, kind, table):
    return triton.autotune(configs=_configs(table), key=["T_BUCKET", "HEAD_DIM"], cache_results=True,
                           prune_configs_by={"early_config_prune": _prune(kind)})(kernel)


_attn_fwd = _autotuned(_attn_fwd_kernel, "fwd", _FWD_CONFIGS)
_attn_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, "dkdv", _DKDV_CONFIGS)
_attn_bwd_dq = _autotuned(_attn_bwd_dq_kernel, "dq", _DQ_CONFIGS)


def _launch(autotuned, kind, grid_rows, bh, args, consts):
    """On a GPU: the autotuned kernel, grid from the chosen config. In the interpreter: the fixed config.
    The caller makes the tensors' device current (on_device) and keeps bh <= MAX_GRID_Y (_bh_chunks)."""
    if args[0].is_cuda:
        grid = lambda meta: (cdiv(grid_rows, meta["BLOCK_M" if kind != "dkdv" else "BLOCK_N"]), bh)
        autotuned[grid](*args, **consts)
    else:
        bm, bn = _INTERPRETER_CONFIG[kind]
        rows = bn if kind == "dkdv" else bm
        autotuned.fn[(cdiv(grid_rows, rows), bh)](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)


# ---- checks ------------------------------------------------------------------------------------

@triton.jit
def _dot_probe(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    """Interpreter only (CPU): one (N x N) tl.dot, to see whether the interpreter computes it right."""
    i = tl.arange(0, N)
    idx = i[:, None] * N + i[None, :]
    tl.store(c_ptr + idx, tl.dot(tl.load(a_ptr + idx), tl.load(b_ptr + idx)))


@functools.lru_cache(maxsize=None)
def _interpreter_bf16_dot_error():
    """Why bf16 attention cannot run in this Triton's interpreter, or None. Triton 3.8's interpreter returns
    garbage for tl.dot on bf16 operands (fp16 and fp32 are right): rather than compute wrong attention
    silently, probe it once against torch.matmul (not assumed from the version: a fixed Triton passes)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    c = torch.zeros(16, 16)
    _dot_probe[(1,)](a, b, c, N=16)
    want = a.float() @ b.float()
    err = (c - want).abs().max().item()
    if err <= 1e-2 * want.abs().max().item():
        return None
    return (f"Triton {triton.__version__}'s interpreter computes tl.dot on bfloat16 wrongly (a 16x16 probe is "
            f"off by {err:.3g}); on the CPU use float16 or float32, or run on a CUDA GPU")


def _check(q, k, v, fake=False):
    """Argument checks of both ops. fake=True (the fake implementations): meta tensors are fine (shape
    inference), and the interpreter's bf16 probe is left to the real call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention (triton): {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention (triton): {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"attention (triton): {name} has dtype {t.dtype}; supported: bfloat16, float16, float32")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"attention (triton): q, k, v must have the same shape (B, H, T, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention (triton): q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention (triton): head dim D = {q.shape[-1]} not supported; supported: 32, 64, 128")
    check_devices("attention", q, k, v, meta_ok=fake)
    dev = q.device
    T, D = q.shape[2], q.shape[3]
    if not _rows_fit(T, D, D):
        raise ValueError(f"attention (triton): T = {T} is too long at D = {D}: one (batch, head) slice must hold "
                         f"fewer than 2^31 elements (the kernels' row offsets are int32)")
    if not fake and dev.type == "cpu" and q.dtype == torch.bfloat16 and _interpreter_bf16_dot_error():
        raise BackendUnavailable(f"attention (triton): {_interpreter_bf16_dot_error()}")


def _check_bwd(do, q, k, v, o, lse, fake=False):
    """attention_bwd's checks, also run by its fake implementation."""
    _check(q, k, v, fake)
    if do.shape != q.shape or o.shape != q.shape or do.dtype != q.dtype or o.dtype != q.dtype:
        raise ValueError(f"attention_bwd (triton): do {tuple(do.shape)} {do.dtype} and o {tuple(o.shape)} {o.dtype} "
                         f"must match q {tuple(q.shape)} {q.dtype}")
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"attention_bwd (triton): lse {tuple(lse.shape)} {lse.dtype} must be float32 "
                         f"of shape {tuple(q.shape[:3])} (as attention_fwd returns it)")
    check_devices("attention_bwd", q, do, o, lse, meta_ok=fake)


# The kernels offset each (batch, head) slice in int64 (b * stride_b + h * stride_h) but its rows in int32
# (offs_m * stride_t, start_n * stride_t: cheaper address math, and the register profile the configs were
# tuned with). Triton passes a stride >= 2^31 as int64, but a smaller one with T * stride_t >= 2^31 wraps
# around (a view with a huge row stride: wrong rows or a crash). So no tensor reaches a kernel with
# T * stride_t + D >= _INT32_ROWS: such an input is copied to (B, H, T, D) contiguous memory first (stride_t
# = D; _check rejects a T for which even that overflows), such an output is allocated that way (_like).
_INT32_ROWS = 2**31


def _rows_fit(T, stride_t, D):
    """Whether T rows stride_t elements apart, D wide, lie within the kernels' int32 row offsets."""
    return T * stride_t + D < _INT32_ROWS

# CUDA caps gridDim.y, where every launch puts its (batch, head) pairs, at 65535 (Triton passes the grid on
# unchecked): a bigger B * H is launched in chunks of the batch (or of the heads, when H alone is bigger).
MAX_GRID_Y = 65535


def _kernel_layout(t):
    """t as the kernels may read it: a unit last-dim stride (else a contiguous copy), and rows within
    int32 offsets (else a contiguous copy; see _INT32_ROWS). Other strides are passed as they are."""
    _, _, T, D = t.shape
    _, _, stride_t, stride_d = t.stride()  # one call each: this runs per tensor per call (host time)
    if stride_d != 1 and D != 1:
        t = t.contiguous()
        stride_t = t.stride(2)
    if not _rows_fit(T, stride_t, D):  # not .contiguous(): at T = 1 it would keep the stride
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return t


def _like(t):
    """An output (B, H, T, D) in (B, T, H, D) memory when t is laid out that way (the model's views of the
    qkv projection: the transpose(1, 2).reshape(B, T, C) after attention is then free) and its rows fit
    int32 offsets (T * H * D + D < 2^31), else contiguous. Explicit, not empty_like: for a non-dense view
    empty_like's layout is not guaranteed."""
    B, H, T, D = t.shape
    if H > 1 and T > 1 and t.stride(2) > t.stride(1) and _rows_fit(T, H * D, D):
        return torch.empty((B, T, H, D), dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _bh_chunks(*tensors):
    """Views of (B, H, ...) tensors, one tuple per launch, each with at most MAX_GRID_Y (batch, head) pairs:
    the tensors themselves when B * H fits (the usual case: no slicing), else ranges of whole batch rows, or,
    when H alone is over the limit, ranges of heads within each batch row. The contiguous (B, H, T) LSE / delta
    stay contiguous in either kind of view, as the kernels index them (bh * T)."""
    B, H, _, _ = tensors[0].shape
    if B * H <= MAX_GRID_Y:
        return (tensors,)
    if H <= MAX_GRID_Y:
        step = MAX_GRID_Y // H
        return [tuple(t[b:b + step] for t in tensors) for b in range(0, B, step)]
    return [tuple(t[b:b + 1, h:h + MAX_GRID_Y] for t in tensors) for b in range(B) for h in range(0, H, MAX_GRID_Y)]


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- torch ops -----------------------------------------------------------------------------------

@torch.library.custom_op("gpt2k::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out: (B, H, T, D) in q's dtype and dimension order; lse: (B, H, T) fp32, natural log)."""
    _check(q, k, v)
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    B, H, T, D = q.shape
    o = _like(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if o.numel():
        scales = (next_power_of_2(T), LOG2E / math.sqrt(D))
        consts = dict(HEAD_DIM=D, DOT_PREC=_dot_prec(q.dtype))
        with on_device(q):
            for qc, kc, vc, oc, lc in _bh_chunks(q, k, v, o, lse):
                Hc = qc.shape[1]
                args = (qc, kc, vc, oc, lc, *_strides(qc), *_strides(kc), *_strides(vc), *_strides(oc), Hc, T, *scales)
                _launch(_attn_fwd, "fwd", T, qc.shape[0] * Hc, args, consts)
    return o, lse


@attention_fwd.register_fake
def _(q, k, v):
    _check(q, k, v, fake=True)  # fake or meta tensors: the probe runs with the real call
    B, H, T, D = q.shape
    return _like(_kernel_layout(q)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("gpt2k::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), each in its input's dtype and dimension order."""
    _check_bwd(do, q, k, v, o, lse)
    q, k, v, o, do = (_kernel_layout(t) for t in (q, k, v, o, do))
    dq, dk, dv = _like(q), _like(k), _like(v)
    _backward_into(do, q, k, v, o, lse, dq, dk, dv)
    return dq, dk, dv


def _backward_into(do, q, k, v, o, lse, dq, dk, dv):
    """The backward's launches, writing dq, dk, dv (given, any strides the kernels take: see _kernel_layout)."""
    B, H, T, D = q.shape
    if not q.numel():
        return
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    bm = _PREPROCESS_BLOCK_M if q.is_cuda else _INTERPRETER_CONFIG["fwd"][0]
    scales = (next_power_of_2(T), 1.0 / math.sqrt(D), LOG2E / math.sqrt(D))
    consts = dict(HEAD_DIM=D, DOT_PREC=_dot_prec(q.dtype))
    with on_device(q):
        for qc, kc, vc, oc, doc, dqc, dkc, dvc, lc, dc in _bh_chunks(q, k, v, o, do, dq, dk, dv, lse, delta):
            Hc = qc.shape[1]
            bh = qc.shape[0] * Hc
            _attn_bwd_preprocess_kernel[(cdiv(T, bm), bh)](
                oc, doc, dc, *_strides(oc), *_strides(doc), Hc, T, HEAD_DIM=D, BLOCK_M=bm)
            common = (*_strides(qc), *_strides(kc), *_strides(vc), *_strides(doc))
            _launch(_attn_bwd_dkdv, "dkdv", T, bh,
                    (qc, kc, vc, doc, dkc, dvc, lc, dc, *common, *_strides(dkc), *_strides(dvc), Hc, T, *scales), consts)
            _launch(_attn_bwd_dq, "dq", T, bh,
                    (qc, kc, vc, doc, dqc, lc, dc, *common, *_strides(dqc), Hc, T, *scales), consts)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse):
    _check_bwd(do, q, k, v, o, lse, fake=True)  # a meta tensor among CPU ones lands here: same checks
    return _like(_kernel_layout(q)), _like(_kernel_layout(k)), _like(_kernel_layout(v))


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    auxiliary_outputs(ctx, lse)


def _backward(ctx, do, _dlse, bwd=attention_bwd):
    q, k, v, o, lse = ctx.saved_tensors
    return bwd(do, q, k, v, o, lse)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_EagerAttention = eager_function(  # kernels/_eager.py: the same, without the dispatcher, for eager calls
    attention_fwd, _setup_context, functools.partial(_backward, bwd=impl(attention_bwd)), "_EagerAttention")


# ---- attention_qkv: straight from the (B, T, 3C) c_attn projection, back to (B, T, C) ------------------
# The model's q, k, v are views of one projection; its split's backward concatenates dq, dk, dv into one
# (B, T, 3C) gradient (a copy: 150 MB read + written per layer at GPT-2's 16384 x 768 bf16), and the views
# around attention cost autograd nodes (host time). attention_qkv takes qkv, returns y (B, T, C), and its
# backward writes dq, dk, dv straight into their slices of one dqkv: same kernels, same values.

def _heads(t, n_head, part=0, parts=1):
    """The (B, n_head, T, D) view of part `part` of `parts` side by side in t (B, T, parts * n_head * D): one
    as_strided over t's own strides (host time: this runs several times per call)."""
    B, T, W = t.shape
    D = W // (parts * n_head)
    sB, sT, sC = t.stride()
    return t.as_strided((B, n_head, T, D), (sB, D * sC, sT, sC), t.storage_offset() + part * n_head * D * sC)


def _split_heads(qkv, n_head):
    return tuple(_heads(qkv, n_head, i, 3) for i in range(3))


@torch.library.custom_op("gpt2k::attention_qkv_fwd", mutates_args=())
def attention_qkv_fwd(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y: (B, T, C) in qkv's dtype, contiguous; lse: (B, n_head, T) fp32)."""
    B, T, C = check_qkv(qkv, n_head, "attention_qkv (triton)")
    o, lse = impl(attention_fwd)(*_split_heads(qkv, n_head))
    return o.transpose(1, 2).reshape(B, T, C), lse  # o is (B, T, H, D) memory (_like): a view, no copy


@attention_qkv_fwd.register_fake
def _(qkv, n_head):
    B, T, C = check_qkv(qkv, n_head, "attention_qkv (triton)")
    _check(*_split_heads(qkv, n_head), fake=True)
    return qkv.new_empty((B, T, C)), qkv.new_empty((B, n_head, T), dtype=torch.float32)


def _check_qkv_bwd(dy, qkv, y, lse, n_head, fake=False):
    B, T, C = check_qkv(qkv, n_head, "attention_qkv_bwd (triton)")
    for name, t in (("dy", dy), ("y", y)):
        if t.shape != (B, T, C):
            raise ValueError(f"attention_qkv_bwd (triton): {name} has shape {tuple(t.shape)}, expected {(B, T, C)}")
    _check_bwd(_heads(dy, n_head), *_split_heads(qkv, n_head), _heads(y, n_head), lse, fake)


@torch.library.custom_op("gpt2k::attention_qkv_bwd", mutates_args=())
def attention_qkv_bwd(dy: torch.Tensor, qkv: torch.Tensor, y: torch.Tensor, lse: torch.Tensor,
                      n_head: int) -> torch.Tensor:
    """-> dqkv (B, T, 3C) in qkv's dtype, contiguous."""
    _check_qkv_bwd(dy, qkv, y, lse, n_head)
    return _qkv_backward_launch(dy, qkv, y, lse, n_head)


def _qkv_backward_launch(dy, qkv, y, lse, n_head):
    """attention_qkv_bwd unchecked (the eager fast path's backward: its inputs come from our forward)."""
    q, k, v = (_kernel_layout(t) for t in _split_heads(qkv, n_head))
    do, o = _kernel_layout(_heads(dy, n_head)), _kernel_layout(_heads(y, n_head))
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    slices = _split_heads(dqkv, n_head)
    if _rows_fit(qkv.shape[1], dqkv.stride(1), q.shape[3]):  # the kernels write dqkv in place
        _backward_into(do, q, k, v, o, lse, *slices)
    else:  # T * 3C too large for the kernels' int32 row offsets: separate outputs, then one copy
        grads = (_like(q), _like(k), _like(v))
        _backward_into(do, q, k, v, o, lse, *grads)
        for s, g in zip(slices, grads):
            s.copy_(g)
    return dqkv


@attention_qkv_bwd.register_fake
def _(dy, qkv, y, lse, n_head):
    _check_qkv_bwd(dy, qkv, y, lse, n_head, fake=True)
    return qkv.new_empty(qkv.shape)


def _qkv_setup_context(ctx, inputs, output):
    qkv, n_head = inputs
    y, lse = output
    ctx.save_for_backward(qkv, y, lse)
    ctx.n_head = n_head
    auxiliary_outputs(ctx, lse)


def _qkv_backward(ctx, dy, _dlse, bwd=attention_qkv_bwd):
    qkv, y, lse = ctx.saved_tensors
    return bwd(dy, qkv, y, lse, ctx.n_head), None  # dy may be strided: read in place (unit last stride)


attention_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)
_EagerAttentionQKV = eager_function(
    attention_qkv_fwd, _qkv_setup_context, functools.partial(_qkv_backward, bwd=_qkv_backward_launch),
    "_EagerAttentionQKV")


def attention(q, k, v):
    """Same as kernels.reference.attention: causal softmax(q k^T / sqrt(D)) v for q, k, v (B, H, T, D)."""
    if fast_path(q):
        return _EagerAttention.apply(q, k, v)[0]
    return attention_fwd(q, k, v)[0]


def attention_qkv(qkv, n_head):
    """Same as kernels.reference.attention_qkv: causal attention of the n_head heads in the (B, T, 3C)
    projection qkv -> (B, T, C); its backward returns dqkv in one tensor (no concatenation)."""
    check_qkv(qkv, n_head, "attention_qkv (triton)")
    if fast_path(qkv):
        return _EagerAttentionQKV.apply(qkv, n_head)[0]
    return attention_qkv_fwd(qkv, n_head)[0]


# ---- ahead-of-time compile specs (GPT-2 shapes) --------------------------------------------------

def compile_specs():
    """Every kernel with every autotune config (and the shared-memory fallbacks: never chosen there, compiled
    to check them) at GPT-2's shape as the model calls it: bf16, D=64, T=1024, q/k/v views of the (B, T, 3C)
    projection (stride_t = 3C = 2304, stride_h = 64), outputs (B, T, H, D) memory. The JIT sees every
    pointer, stride, T and T_BUCKET divisible by 16 there; H = 12 is not."""
    bf, f32, i32 = "*bf16", "*fp32", "i32"

    def strided(*names):
        return {f"stride_{n}{s}": i32 for n in names for s in "bht"}

    fwd_sig = {"Q": bf, "K": bf, "V": bf, "O": bf, "LSE": f32, **strided("q", "k", "v", "o"),
               "H": i32, "T": i32, "T_BUCKET": i32, "qk_scale": "fp32"}
    bwd_sig = {"Q": bf, "K": bf, "V": bf, "DO": bf}
    dkdv_sig = {**bwd_sig, "DK": bf, "DV": bf, "LSE": f32, "DELTA": f32, **strided("q", "k", "v", "do", "dk", "dv"),
                "H": i32, "T": i32, "T_BUCKET": i32, "sm_scale": "fp32", "qk_scale": "fp32"}
    dq_sig = {**bwd_sig, "DQ": bf, "LSE": f32, "DELTA": f32, **strided("q", "k", "v", "do", "dq"),
              "H": i32, "T": i32, "T_BUCKET": i32, "sm_scale": "fp32", "qk_scale": "fp32"}
    pre_sig = {"O": bf, "DO": bf, "DELTA": f32, **strided("o", "do"), "H": i32, "T": i32}

    def aligned(sig):  # everything but H and the float scales
        return tuple(n for n, t in sig.items() if n != "H" and t != "fp32")

    specs = []
    for kind, fn, sig, table in (("fwd", _attn_fwd, fwd_sig, _FWD_CONFIGS),
                                 ("bwd_dkdv", _attn_bwd_dkdv, dkdv_sig, _DKDV_CONFIGS),
                                 ("bwd_dq", _attn_bwd_dq, dq_sig, _DQ_CONFIGS)):
        fallback = _FALLBACK_CONFIGS[kind.replace("bwd_", "")]
        for bm, bn, warps, stages in table + fallback:
            is_fallback = (bm, bn, warps, stages) in fallback
            label = " (fallback)" if is_fallback else ""
            specs.append(AotSpec(
                name=f"attention_{kind} bf16 D=64 T=1024 BLOCK_M={bm} BLOCK_N={bn} w{warps} s{stages}{label}", fn=fn.fn,
                signature={**sig, "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                           "DOT_PREC": "constexpr"},
                constexprs={"HEAD_DIM": 64, "BLOCK_M": bm, "BLOCK_N": bn, "DOT_PREC": "tf32"},
                aligned=aligned(sig), num_warps=warps, num_stages=stages,
                # the configs the autotuner picks among must reach Hopper's wgmma on sm_90; the small fallback
                # tiles (a card with little shared memory) must at least use tensor cores
                mma="tensor_cores" if is_fallback else "wgmma"))
    specs.append(AotSpec(
        name=f"attention_bwd_preprocess bf16 D=64 T=1024 BLOCK_M={_PREPROCESS_BLOCK_M}", fn=_attn_bwd_preprocess_kernel,
        signature={**pre_sig, "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr"},
        constexprs={"HEAD_DIM": 64, "BLOCK_M": _PREPROCESS_BLOCK_M}, aligned=aligned(pre_sig), num_warps=4))
    return specs
