"""LayerNorm over the last dim in Triton, forward and backward, as torch ops gpt2k::layer_norm_fwd / _bwd,
and the residual add fused in front of it: gpt2k::add_layer_norm_fwd (the model's every residual add: x + attn
in ln_2, x + mlp in the next block's ln_1 or in ln_f).

What is fused
  forward   one pass over a tile of rows: fp32 mean and variance, y = (x - mean) * rstd * w + b stored in
            x's dtype (or out_dtype: the model asks for the autocast dtype, which the next matmul would
            cast y to anyway: no cast kernel forward, none backward, and half the bytes of y and dy for an
            fp32 stream under bf16 autocast), and the fp32 row statistics (mean, rstd) for the backward.
  backward  one pass over the same tiles: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w,
            while each program sums dy * xhat and dy over its rows in fp32 registers and writes them as its
            row of a (programs, 2, C) fp32 buffer; one torch .sum(0) over that small buffer gives
            (dw, db) as a (2, C) tensor, the op's second output.
            Fixed partition, fixed order, no atomics: the same inputs and launch config give bitwise the same
            gradients (an autotuned config is cached on disk: the same one in every process on a machine).
  x, w, b may differ in dtype (bf16 x with fp32 w under autocast); all math is fp32.
  add_layer_norm(x, r, w, b) -> (s, y): the forward loads x and r, stores s = x + r (rounded to s's dtype,
            PyTorch's promotion of the two: fp32 for the fp32 residual stream + a bf16 branch under
            autocast) and normalizes s; the backward reads ds, the gradient reaching s by the residual
            path, and writes dx + ds once: the gradient of both x and r (gpt2k::add_layer_norm_bwd: when x
            and r differ in dtype, the same registers are stored a second time in the narrower one, instead
            of a cast kernel reading the gradient again afterwards). Unfused, the add costs a pass
            (read x, r, write s) that the LayerNorm then reads again, and autograd sums s's two gradients
            in another pass: the fused op saves one read of s forward and a read + write backward.

Floor (N rows of C; s = bytes per element of x, sw of w and b)
  forward   read x, w, b; write y, mean, rstd      2*N*C*s + 2*C*sw + 8*N
  backward  read dy, x, w, mean, rstd; write dx, dw, db   3*N*C*s + 8*N + 3*C*sw
  At 16384 x 768 bf16: fwd 50.4 MB, bwd 75.6 MB.
  add_layer_norm: forward + N*C*(s_r + s) (read r, write s), backward + N*C*s (read ds). As the model runs
  it under bf16 autocast at 16384 x 768 (fp32 x, s; bf16 r and y = out_dtype, so bf16 dy): fwd 151 MB, bwd
  176 MB + 25 MB for r's bf16 gradient, written by the same kernel (bench/specs.py: 201 MB; before, a cast
  kernel wrote it and read the 50 MB fp32 gradient again). With y in fp32 (no out_dtype): 176 and 227 MB.
Total / floor: every forward program re-reads w and b (4 rows per program at C = 768: total/floor ~1.5
counting every load, but they hit L1/L2 and DRAM sees them about once). mean and rstd are 8 bytes per row
(0.5% of the floor at C = 768). The backward reads w once per program, and writes and re-reads the (P, 2, C)
fp32 partial buffer, P = 4 x SMs with the fixed launch (528 on an H100; 1 to 8 x SMs among the autotune
configs): 2 x 2 x P x C x 4 bytes = 6.5 MB at C = 768 and P = 528, at most 9% over the floor if none of it
stayed in L2 (most of it does). Unique bytes in `python -m bench.io_audit`.
Launch configs: a fixed one (_tile, BWD_PROGRAMS_PER_SM, BWD_STAGES), measured on an H100 at 22 us forward
and 74 us backward (3.0x its floor); on a GPU, inputs of >= AUTOTUNE_MIN_ELEMENTS are autotuned among FWD_TUNE /
BWD_TUNE (pipelined tile loops, other tile shapes and programs per SM; the fixed config is one of them), the
choice cached on disk. Prediction (not measured yet): the backward at 16384 x 768 bf16 from 74 to ~35 us.
add_layer_norm is not measured on a GPU yet (its +ds backward uses 152 registers on sm_90 at the fixed config).

Test: pytest tests/test_layernorm.py (interpreter on CPU, real kernel on a GPU; the autotuned path runs in the
interpreter with a stand-in timer). Benchmark: python bench/run.py layer_norm add_layer_norm; sweep: bench/ln_tune.py;
static report: compile_specs() via kernels/_triton_utils.py (every autotune config at GPT-2's shapes).
"""
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._eager import (auxiliary_outputs, cdiv, check_devices, eager_function, fast_path, next_power_of_2,
                            on_device)
from kernels._triton_utils import AotSpec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_C = 16384  # whole rows live in registers; wider rows would need a looped kernel (GPT-2 XL has C = 1600)


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (N, C) input, row stride stride_x, unit column stride
    r_ptr,  # (N, C) residual added to x first (HAS_RESIDUAL), row stride stride_r
    s_ptr,  # (N, C) x + residual, contiguous, written when HAS_RESIDUAL
    w_ptr,  # (C,) weight, any float dtype
    b_ptr,  # (C,) bias, any float dtype
    y_ptr,  # (N, C) output, contiguous, x's dtype (s's with a residual) or out_dtype
    mean_ptr,  # (N,) fp32
    rstd_ptr,  # (N,) fp32, 1 / sqrt(var + eps)
    stride_x,
    stride_r,
    N,
    C,
    eps,
    ROWS_BUCKET,  # next power of two >= N: an autotune key only (kernel code ignores it)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # next power of two >= C
    HAS_RESIDUAL: tl.constexpr,  # normalize s = x + residual (and store s) instead of x
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # s = x + residual in fp32, rounded to s's dtype as PyTorch's add rounds it
        r = tl.load(r_ptr + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + rows64 * C + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    # IEEE-rounded division and sqrt (Triton's `/` and tl.sqrt are ~2-ulp approximations on a GPU): with
    # rstd up to 1/sqrt(eps) ~ 316, an ulp in the mean shows up as 1e-5 in dx (seen at C = 1 on an H100).
    Cf = C * 1.0  # works whether C is a runtime int or specialized to constexpr 1
    mean = tl.div_rn(tl.sum(x, axis=1), Cf)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(xc * xc, axis=1), Cf) + eps))
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows64 * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,  # (N, C) upstream gradient, row stride stride_dy
    x_ptr,  # (N, C) forward input, row stride stride_x
    w_ptr,  # (C,) weight
    mean_ptr,  # (N,) fp32, from the forward
    rstd_ptr,  # (N,) fp32, from the forward
    dx_ptr,  # (N, C) output, contiguous, x's dtype
    ds_ptr,  # (N, C) gradient reaching x by another path, added to dx (HAS_DS), row stride stride_ds
    dr_ptr,  # (N, C) contiguous: dx again, in another dtype (HAS_DR: add_layer_norm's narrower input's gradient)
    part_ptr,  # (P, 2, C) fp32, P >= programs: [p, 0] program p's sum of dy * xhat over its rows, [p, 1] of dy
    stride_dy,
    stride_x,
    stride_ds,
    N,
    C,
    ROWS_BUCKET,  # next power of two >= N: an autotune key only
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,  # software pipelining of the tile loop's loads (1: none; 2+: cp.async prefetch)
    PER_SM: tl.constexpr,  # programs per SM in the launch grid (_bwd_programs): a launch parameter the kernel ignores
    HAS_DS: tl.constexpr,  # add ds to dx (the residual branch of add_layer_norm)
    HAS_DR: tl.constexpr,  # also store dx rounded to dr's dtype (instead of a cast kernel afterwards)
):
    pid = tl.program_id(0)
    # program p handles row tiles [p * tiles_per_program, (p + 1) * tiles_per_program): with the grid of
    # _bwd_programs, every program gets at least one tile
    tiles_per_program = tl.cdiv(tl.cdiv(N, BLOCK_R), tl.num_programs(0))
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    first = pid * tiles_per_program
    for tile in tl.range(first, first + tiles_per_program, num_stages=STAGES):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N  # the last program's surplus tiles are fully masked
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.div_rn(tl.sum(xhat * g, axis=1), C * 1.0)
        c2 = tl.div_rn(tl.sum(g, axis=1), C * 1.0)
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(ds_ptr + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows64 * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DR:
            tl.store(dr_ptr + rows64 * C + cols[None, :], dx.to(dr_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    part = part_ptr + pid.to(tl.int64) * 2 * C + cols
    tl.store(part, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(part + C, tl.sum(db_acc, axis=0), mask=col_ok)


@functools.lru_cache(maxsize=None)
def _tile(C, on_gpu=True):
    """(BLOCK_R, BLOCK_C, num_warps): whole rows, ~4096 elements per tile, ~16 elements per thread
    (two 128-bit loads of bf16), e.g. C = 768 -> 4 rows x 1024, 8 warps. On the CPU (Triton's
    interpreter, whose cost is per program and per op, not per element) tiles are 8x taller."""
    block_c = next_power_of_2(C)
    elements = 4096 if on_gpu else 32768
    block_r = max(1, min(64, elements // block_c))
    num_warps = max(1, min(16, block_r * block_c // 512))
    return block_r, block_c, num_warps


# The fixed launch: backward programs per SM and loop pipelining stages. Measured on an H100 (bench/NOTES.md):
# 4 per SM, no pipelining, 74 us at 16384 x 768 bf16. Used in the interpreter, for small inputs on a GPU, and
# with GPT2K_LN_AUTOTUNE=0; large inputs on a GPU are autotuned (below).
BWD_PROGRAMS_PER_SM = 4
BWD_STAGES = 1


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs_target(device):
    if device.type == "cuda":
        return BWD_PROGRAMS_PER_SM * _sm_count(device)
    return 4  # the interpreter runs programs one after another: few programs, same code path


def _bwd_programs(tiles, target):
    """The backward's grid for `tiles` row tiles and about `target` programs: as many programs as
    tiles_per_program = cdiv(tiles, target) needs, so that none is left without a tile (the kernel derives
    the same partition from its grid size)."""
    return cdiv(tiles, cdiv(tiles, target))


# ---- autotuning on a GPU ----------------------------------------------------------------------------
# The backward ran at 3x its floor with the fixed launch (bench/NOTES.md): its loop over row tiles is serial
# and, at 128 registers x 8 warps, two programs per SM do not keep enough loads in flight. On a GPU, inputs
# of at least AUTOTUNE_MIN_ELEMENTS are launched by triton.autotune among the configs below (smaller ones and
# the interpreter take the fixed launch: tuning costs seconds per shape), keyed on C, the next power of two of
# N, the residual flag and every pointer's dtype. The choice is cached on disk (Triton's cache_results), so
# later processes on the same machine reuse it and compute bitwise the same gradients: the weight gradient's
# summation order depends on the config (rows per tile, programs). GPT2K_LN_AUTOTUNE=0 turns it off.
# Tables written for rows of BLOCK_C = 1024 (GPT-2's C = 768); _scaled() keeps each config's elements per tile
# and per thread for other widths. Backward registers on sm_90 (static report, compile_specs() below) with
# bf16 rows / fp32 rows and bf16 dy: R=4 w8 stages 1: 128 / 125, stages 2: 128 / 171, stages 3: 145 / 169;
# R=2 w4 s2 124 / 163; R=2 w8 s2 91 / 113; R=4 w16 s2 91 / 109; R=1 w2 s2 128 / 155. Stages >= 2 turn the
# tile loop's loads into 16-byte cp.async prefetches (one, resp. two tiles in flight per program while it
# computes another). The first entry of each table is the fixed launch.
AUTOTUNE = os.environ.get("GPT2K_LN_AUTOTUNE", "1") != "0"
AUTOTUNE_MIN_ELEMENTS = 1 << 22  # N * C; GPT-2 at B*T = 16384: 12.6M
FWD_TUNE = [(4, 8), (2, 4), (1, 4), (2, 8), (8, 16), (1, 2)]  # (rows per tile, warps)
BWD_TUNE = [(4, 8, 1, 4), (4, 8, 2, 2), (4, 8, 3, 2), (2, 4, 2, 4), (2, 8, 2, 3), (4, 16, 2, 1),  # (rows, warps,
            (1, 2, 2, 8)]  # stages, programs per SM)


def _scaled(rows, warps, block_c):
    """A (rows x 1024, warps) tile of the tables for rows of block_c: the same elements per tile and per
    thread (more rows for narrower rows, up to 64; for wider ones fewer rows, then one row on more warps,
    up to 16). For block_c = 1024 the config itself; _tile()'s for the first entry at any width."""
    elements = rows * 1024
    r = max(1, min(64, elements // block_c))
    return r, max(1, min(16, warps * r * block_c // elements))


@functools.lru_cache(maxsize=None)
def _fwd_configs(block_c):
    seen = {_scaled(r, w, block_c) for r, w in FWD_TUNE}
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r, w in sorted(seen)]


@functools.lru_cache(maxsize=None)
def _bwd_configs(block_c):
    seen = {(*_scaled(r, w, block_c), stages, per_sm) for r, w, stages, per_sm in BWD_TUNE}
    return [triton.Config({"BLOCK_R": r, "STAGES": st, "PER_SM": p}, num_warps=w) for r, w, st, p in sorted(seen)]


def _tuned_bwd_programs(meta, N, sms):
    """The grid of an autotuned backward launch: `meta` holds the config's BLOCK_R and PER_SM."""
    return _bwd_programs(cdiv(N, meta["BLOCK_R"]), meta["PER_SM"] * sms)


@functools.lru_cache(maxsize=64)
def _tuned_part_rows(N, block_c, sms):
    """Rows of the autotuned backward's partial-sum buffer: the largest grid among the configs."""
    return max(_tuned_bwd_programs(c.kwargs, N, sms) for c in _bwd_configs(block_c))


# The autotuners: configs rescaled to this call's BLOCK_C by the prune hook (which receives the call's kwargs).
_layer_norm_fwd_tuned = triton.autotune(
    configs=_fwd_configs(1024), key=["C", "ROWS_BUCKET", "HAS_RESIDUAL"], cache_results=True,
    prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: _fwd_configs(kw["BLOCK_C"])},
)(_layer_norm_fwd_kernel)
_layer_norm_bwd_tuned = triton.autotune(
    configs=_bwd_configs(1024), key=["C", "ROWS_BUCKET", "HAS_DS", "HAS_DR"], cache_results=True,
    prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: _bwd_configs(kw["BLOCK_C"])},
)(_layer_norm_bwd_kernel)


def _autotuned(x, N, C):
    """Whether this launch is autotuned: a CUDA tensor of at least AUTOTUNE_MIN_ELEMENTS, AUTOTUNE on."""
    return AUTOTUNE and x.is_cuda and N * C >= AUTOTUNE_MIN_ELEMENTS


# ---- checks ------------------------------------------------------------------------------------

def _check(x, weight, bias, out_dtype=None):
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t.dtype not in DTYPES:
            raise TypeError(f"layer_norm (triton): {name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TypeError(f"layer_norm (triton): out_dtype {out_dtype} not supported; supported: None (x's dtype), "
                        "float32, bfloat16, float16")
    if x.dim() == 0:
        raise ValueError("layer_norm (triton): x must have at least one dimension (normalized over the last)")
    C = x.shape[-1]
    if not 1 <= C <= MAX_C:
        raise ValueError(f"layer_norm (triton): last dim {C} not supported; supported: 1 to {MAX_C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"layer_norm (triton): {name} has shape {tuple(t.shape)}, expected ({C},) to match x's last dim")


def _check_add(x, residual, weight, bias, out_dtype=None):
    _check(x, weight, bias, out_dtype)
    if residual.dtype not in DTYPES:
        raise TypeError(f"add_layer_norm (triton): residual has dtype {residual.dtype}; supported: float32, bfloat16, float16")
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm (triton): residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}; "
                         "they must be equal (no broadcasting)")


def _check_bwd(dy, x, weight, mean, rstd, ds=None, narrow_dtype=None, op="layer_norm_bwd", fake=False):
    """The backward ops' checks, also run by their fake implementations (fake=True: meta tensors are fine;
    the dispatcher also sends them a meta tensor among CPU ones, which must raise). narrow_dtype:
    add_layer_norm_bwd's."""
    if narrow_dtype is not None and narrow_dtype not in DTYPES:
        raise TypeError(f"{op} (triton): narrow_dtype {narrow_dtype} not supported; supported: float32, "
                        "bfloat16, float16")
    if ds is not None and (ds.shape != x.shape or ds.dtype not in DTYPES):
        raise ValueError(f"layer_norm_bwd (triton): ds {tuple(ds.shape)} {ds.dtype} must have x's shape "
                         f"{tuple(x.shape)} and a dtype in float32, bfloat16, float16")
    _check(x, weight, weight)
    if dy.shape != x.shape or dy.dtype not in DTYPES:
        raise ValueError(f"layer_norm_bwd (triton): dy {tuple(dy.shape)} {dy.dtype} must have x's shape "
                         f"{tuple(x.shape)} and a dtype in float32, bfloat16, float16")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.shape != x.shape[:-1] or t.dtype != torch.float32:
            raise ValueError(f"layer_norm_bwd (triton): {name} {tuple(t.shape)} {t.dtype} must be float32 of "
                             f"shape {tuple(x.shape[:-1])} (as layer_norm_fwd returns it)")
    check_devices(op, dy, x, weight, mean, rstd, *(() if ds is None else (ds,)), meta_ok=fake)


def _rows(t):
    """(..., C) -> a (N, C) view (or copy) whose columns are contiguous; rows may be strided."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1 and t2.shape[-1] > 1:
        t2 = t2.contiguous()
    return t2


# ---- torch ops -----------------------------------------------------------------------------------

def _forward(x, residual, weight, bias, eps, out_dtype):
    """The forward launch: (s or None, y, mean, rstd); s = x + residual when residual is given."""
    src = x if residual is None else residual
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)  # as PyTorch's add
    C = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype or s_dtype, device=x.device)
    s = None if residual is None else torch.empty(x.shape, dtype=s_dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    x2, r2 = _rows(x), _rows(src)
    N = x2.shape[0]
    if N:
        block_r, block_c, num_warps = _tile(C, x.is_cuda)
        args = (x2, r2, y if s is None else s, weight.contiguous(), bias.contiguous(), y, mean, rstd,
                x2.stride(0), r2.stride(0), N, C, eps, next_power_of_2(N))
        with on_device(x):  # Triton launches on the current device: make it x's
            if _autotuned(x, N, C):
                _layer_norm_fwd_tuned[lambda meta: (cdiv(N, meta["BLOCK_R"]),)](
                    *args, BLOCK_C=block_c, HAS_RESIDUAL=residual is not None)
            else:
                _layer_norm_fwd_kernel[(cdiv(N, block_r),)](
                    *args, BLOCK_R=block_r, BLOCK_C=block_c, HAS_RESIDUAL=residual is not None, num_warps=num_warps)
    return s, y, mean, rstd


@torch.library.custom_op("gpt2k::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y in out_dtype or x's dtype, contiguous; mean (x.shape[:-1]) fp32; rstd fp32)."""
    _check(x, weight, bias, out_dtype)
    check_devices("layer_norm", x, weight, bias)
    return _forward(x, None, weight, bias, eps, out_dtype)[1:]


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype=None):
    _check(x, weight, bias, out_dtype)
    check_devices("layer_norm", x, weight, bias, meta_ok=True)  # a meta tensor among CPU ones lands here
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), mean, torch.empty_like(mean)


@torch.library.custom_op("gpt2k::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       out_dtype: Optional[torch.dtype] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (s = x + residual in PyTorch's promotion of the two dtypes, y = layer_norm(s) in out_dtype or s's
    dtype, both contiguous; mean fp32; rstd fp32)."""
    _check_add(x, residual, weight, bias, out_dtype)
    check_devices("add_layer_norm", x, residual, weight, bias)
    return _forward(x, residual, weight, bias, eps, out_dtype)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, out_dtype=None):
    _check_add(x, residual, weight, bias, out_dtype)
    check_devices("add_layer_norm", x, residual, weight, bias, meta_ok=True)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=out_dtype or dtype), mean,
            torch.empty_like(mean))


def _backward_launch(dy, x, weight, mean, rstd, ds=None, dr_dtype=None):
    """The backward launch, unchecked (the eager fast path's backward: its inputs come from our forward).
    -> (dx, dwb), or (dx, dr, dwb) with dr_dtype: dx also written in that dtype by the same kernel."""
    C = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dr = None if dr_dtype is None else torch.empty(x.shape, dtype=dr_dtype, device=x.device)
    x2, dy2 = _rows(x), _rows(dy)
    ds2 = dy2 if ds is None else _rows(ds)
    N = x2.shape[0]
    if N == 0:
        dwb = torch.zeros((2, C), dtype=torch.float32, device=x.device)
        return (dx, dwb) if dr is None else (dx, dr, dwb)
    block_r, block_c, num_warps = _tile(C, x.is_cuda)
    args = (dy2, x2, weight.contiguous(), mean.contiguous(), rstd.contiguous(), dx, ds2, dx if dr is None else dr)
    strides = (dy2.stride(0), x2.stride(0), ds2.stride(0), N, C, next_power_of_2(N))
    if _autotuned(x, N, C):  # every config writes its programs' rows of one buffer sized for the largest grid
        sms = _sm_count(x.device)
        part = torch.empty((_tuned_part_rows(N, block_c, sms), 2, C), dtype=torch.float32, device=x.device)
        with on_device(x):
            _layer_norm_bwd_tuned[lambda meta: (_tuned_bwd_programs(meta, N, sms),)](
                *args, part, *strides, BLOCK_C=block_c, HAS_DS=ds is not None, HAS_DR=dr is not None)
        programs = _tuned_bwd_programs(_layer_norm_bwd_tuned.best_config.kwargs, N, sms)  # the launch that wrote dx
    else:
        programs = _bwd_programs(cdiv(N, block_r), _programs_target(x.device))
        part = torch.empty((programs, 2, C), dtype=torch.float32, device=x.device)  # each program writes its rows
        with on_device(x):
            _layer_norm_bwd_kernel[(programs,)](
                *args, part, *strides, BLOCK_R=block_r, BLOCK_C=block_c, STAGES=BWD_STAGES,
                PER_SM=BWD_PROGRAMS_PER_SM, HAS_DS=ds is not None, HAS_DR=dr is not None, num_warps=num_warps)
    dwb = part[:programs].sum(0)
    return (dx, dwb) if dr is None else (dx, dr, dwb)


@torch.library.custom_op("gpt2k::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, ds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx in x's dtype, contiguous; (2, C) fp32: dweight, dbias). ds, if given (x's shape), is a gradient
    reaching x by another path (add_layer_norm's s output): dx = its sum with the LayerNorm's. One output for
    both parameter gradients: they come from one reduction, and an op's outputs may not alias each other."""
    _check_bwd(dy, x, weight, mean, rstd, ds)
    return _backward_launch(dy, x, weight, mean, rstd, ds)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, ds=None):
    _check_bwd(dy, x, weight, mean, rstd, ds, fake=True)
    return x.new_empty(x.shape), x.new_empty((2, x.shape[-1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype
    auxiliary_outputs(ctx, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd, bwd=layer_norm_bwd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dwb = bwd(dy, x, weight, mean, rstd)  # dy in y's dtype: the kernel reads any
    return dx, dwb[0].to(weight.dtype), dwb[1].to(ctx.bias_dtype), None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
_EagerLayerNorm = eager_function(  # kernels/_eager.py: the same, without the dispatcher, for eager calls
    layer_norm_fwd, _setup_context, functools.partial(_backward, bwd=_backward_launch), "_EagerLayerNorm")


def _add_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, bias.dtype)
    auxiliary_outputs(ctx, mean, rstd)  # and an unused s's or y's gradient is None: see _add_backward


@torch.library.custom_op("gpt2k::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, ds: Optional[torch.Tensor], narrow_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """layer_norm_bwd for add_layer_norm whose x and residual differ in dtype (the model's fp32 stream + a
    bf16 branch): -> (dsum in s's dtype, dsum in narrow_dtype, (2, C) fp32 dweight / dbias), both copies of
    the gradient written by the one kernel (no cast kernel reading dsum again afterwards)."""
    _check_bwd(dy, s, weight, mean, rstd, ds, narrow_dtype, "add_layer_norm_bwd")
    return _backward_launch(dy, s, weight, mean, rstd, ds, narrow_dtype)


@add_layer_norm_bwd.register_fake
def _(dy, s, weight, mean, rstd, ds, narrow_dtype):
    _check_bwd(dy, s, weight, mean, rstd, ds, narrow_dtype, "add_layer_norm_bwd", fake=True)
    return s.new_empty(s.shape), s.new_empty(s.shape, dtype=narrow_dtype), s.new_empty((2, s.shape[-1]),
                                                                                      dtype=torch.float32)


def _add_backward(ctx, ds, dy, _dmean, _drstd, bwd=layer_norm_bwd, bwd_narrow=add_layer_norm_bwd):
    # d(x + residual) = ds (from s's other uses) + the LayerNorm's dx, in one pass: it is both inputs' gradient,
    # in s's dtype, and (when x and residual differ in dtype) in the narrower one, written by the same kernel
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only s was used: the LayerNorm's part is zero (ds None, only y used: the kernel skips it)
        dy = torch.zeros_like(s)
    x_dtype, r_dtype, b_dtype = ctx.dtypes
    need_x, need_r = ctx.needs_input_grad[:2]
    # s has the wider dtype (fp32 for fp16 + bf16); a narrower input that needs its gradient gets it from the kernel
    narrow = r_dtype if need_r and r_dtype != s.dtype else x_dtype if need_x and x_dtype != s.dtype else None
    if narrow is None:
        (dsum, dwb), dnarrow = bwd(dy, s, weight, mean, rstd, ds), None
    else:
        dsum, dnarrow, dwb = bwd_narrow(dy, s, weight, mean, rstd, ds, narrow)

    def grad(dtype, needed):
        if not needed:
            return None
        return dsum if dtype == s.dtype else dnarrow if dtype == narrow else dsum.to(dtype)
    return grad(x_dtype, need_x), grad(r_dtype, need_r), dwb[0].to(weight.dtype), dwb[1].to(b_dtype), None, None


add_layer_norm_fwd.register_autograd(_add_backward, setup_context=_add_setup_context)
_EagerAddLayerNorm = eager_function(
    add_layer_norm_fwd, _add_setup_context,
    functools.partial(_add_backward, bwd=_backward_launch, bwd_narrow=_backward_launch), "_EagerAddLayerNorm")


def _affine(x, weight, bias):
    C = x.shape[-1] if x.dim() else 0
    if weight is None:
        weight = torch.ones(C, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(C, dtype=x.dtype, device=x.device)
    return weight, bias


def layer_norm(x, weight, bias, eps=1e-5, out_dtype=None):
    """Same as kernels.reference.layer_norm: normalize over the last dim, fp32 statistics, output in
    out_dtype (default x's dtype). weight/bias of None mean 1 and 0 (no affine gradient)."""
    weight, bias = _affine(x, weight, bias)
    if fast_path(x):
        return _EagerLayerNorm.apply(x, weight, bias, float(eps), out_dtype)[0]
    return layer_norm_fwd(x, weight, bias, float(eps), out_dtype)[0]


def add_layer_norm(x, residual, weight, bias, eps=1e-5, out_dtype=None):
    """Same as kernels.reference.add_layer_norm: (s, layer_norm(s)) with s = x + residual, one kernel
    forward and one backward (where s's gradient and the LayerNorm's are summed); y in out_dtype."""
    weight, bias = _affine(x, weight, bias)
    if fast_path(x):
        return tuple(_EagerAddLayerNorm.apply(x, residual, weight, bias, float(eps), out_dtype)[:2])
    return tuple(add_layer_norm_fwd(x, residual, weight, bias, float(eps), out_dtype)[:2])


# ---- ahead-of-time compile specs (GPT-2 shapes) --------------------------------------------------

def compile_specs():
    """The kernels as the JIT specializes them for GPT-2: (B*T, 768) rows, all pointers, strides, N and C
    divisible by 16; bf16 rows with bf16 or fp32 (autocast) weights, and fp32 rows with fp32 weights: under
    bf16 autocast the residual stream, which is what the model's LayerNorms read, stays fp32, and the model
    has y written in bf16 (out_dtype; dy comes back in bf16). Plus add_layer_norm as the model runs it under
    autocast: fp32 stream + bf16 branch output, fp32 s, bf16 y. Each case with the fixed launch; the three
    that a GPT-2 step on a GPU autotunes (the bench's bf16 rows with fp32 weights, the model's fp32 rows with
    bf16 y, and its add_layer_norm) with every autotune config too."""
    block_r, block_c, num_warps = _tile(768, on_gpu=True)
    fixed = {"BLOCK_R": block_r, "num_warps": num_warps}
    specs = []
    # (label, x/s dtype, residual dtype or None, weight dtype, y/dy dtype, autotuned at GPT-2 shapes)
    cases = [("", "bf16", None, "bf16", "bf16", False), ("", "bf16", None, "fp32", "bf16", True),
             ("", "fp32", None, "fp32", "fp32", False), ("", "fp32", None, "fp32", "bf16", True),
             ("add_", "fp32", "bf16", "fp32", "bf16", True)]
    for label, xt, rt, wt, yt, tuned in cases:
        add = rt is not None
        y_label = f" y={yt}" if yt != xt else ""
        fwd = [fixed] + ([{**c.kwargs, "num_warps": c.num_warps} for c in _fwd_configs(block_c)] if tuned else [])
        bwd = [{**fixed, "STAGES": BWD_STAGES, "PER_SM": BWD_PROGRAMS_PER_SM}]
        bwd += [{**c.kwargs, "num_warps": c.num_warps} for c in _bwd_configs(block_c)] if tuned else []
        for i, cfg in enumerate(fwd):
            if i and cfg == fwd[0]:
                continue  # the fixed launch is also an autotune config: compiled once
            warps = cfg["num_warps"]
            specs.append(AotSpec(
                name=(f"{label}layer_norm_fwd x={xt}{f' r={rt}' if add else ''}{y_label} w={wt} C=768"
                      + (f" R={cfg['BLOCK_R']} w{warps} (autotune)" if i else "")),
                fn=_layer_norm_fwd_kernel,
                signature={"x_ptr": f"*{xt}", "r_ptr": f"*{rt or xt}", "s_ptr": f"*{xt}", "w_ptr": f"*{wt}",
                           "b_ptr": f"*{wt}", "y_ptr": f"*{yt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                           "stride_x": "i32", "stride_r": "i32", "N": "i32", "C": "i32", "eps": "fp32",
                           "ROWS_BUCKET": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr",
                           "HAS_RESIDUAL": "constexpr"},
                constexprs={"BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": block_c, "HAS_RESIDUAL": add}, num_warps=warps,
                aligned=("x_ptr", "r_ptr", "s_ptr", "w_ptr", "b_ptr", "y_ptr", "mean_ptr", "rstd_ptr", "stride_x",
                         "stride_r", "N", "C", "ROWS_BUCKET")))
        for i, cfg in enumerate(bwd):
            if i and cfg == bwd[0]:
                continue
            warps = cfg["num_warps"]
            specs.append(AotSpec(
                name=(f"{label}layer_norm_bwd x={xt}{y_label.replace('y=', 'dy=')} w={wt}{f' +ds dr={rt}' if add else ''} C=768"
                      + (f" R={cfg['BLOCK_R']} w{warps} stages={cfg['STAGES']} {cfg['PER_SM']}/SM (autotune)" if i else "")),
                fn=_layer_norm_bwd_kernel,
                signature={"dy_ptr": f"*{yt}", "x_ptr": f"*{xt}", "w_ptr": f"*{wt}", "mean_ptr": "*fp32",
                           "rstd_ptr": "*fp32", "dx_ptr": f"*{xt}", "ds_ptr": f"*{xt}", "dr_ptr": f"*{rt or xt}",
                           "part_ptr": "*fp32", "stride_dy": "i32", "stride_x": "i32", "stride_ds": "i32", "N": "i32",
                           "C": "i32", "ROWS_BUCKET": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr",
                           "STAGES": "constexpr", "PER_SM": "constexpr", "HAS_DS": "constexpr", "HAS_DR": "constexpr"},
                constexprs={"BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": block_c, "STAGES": cfg["STAGES"],
                            "PER_SM": cfg["PER_SM"], "HAS_DS": add, "HAS_DR": add and rt != xt},
                num_warps=warps,
                aligned=("dy_ptr", "x_ptr", "w_ptr", "mean_ptr", "rstd_ptr", "dx_ptr", "ds_ptr", "dr_ptr", "part_ptr",
                         "stride_dy", "stride_x", "stride_ds", "N", "C", "ROWS_BUCKET")))
    return specs
