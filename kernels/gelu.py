"""GELU, tanh approximation (GPT-2's "gelu_new"), in Triton: forward and backward as torch ops
gpt2k::gelu_fwd / gpt2k::gelu_bwd.

    gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
            = x * sigmoid(2u)        since 1 + tanh(u) = 2 sigmoid(2u)

The sigmoid form needs no tanh (libdevice does not run in Triton's interpreter) and has no
cancellation in 1 + tanh(u) for negative x. With z = 2u and s = sigmoid(z):
    d gelu / dx = s + x s (1 - s) dz/dx,   dz/dx = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)
s and s (1 - s) both come from t = exp(-|z|) (see _sigmoid_and_slope), accurate for any x.

What is fused: everything per element; loads in the input's dtype, math in fp32, one store. The backward
recomputes s from x instead of saving it (saving would cost a write and a read of N elements).
Floor (N elements, s bytes each): forward read x, write y = 2*N*s; backward read x, dy, write dx = 3*N*s.
At 16384 x 3072 bf16: fwd 201 MB, bwd 302 MB. Total equals the floor: every element is touched once.

Test: pytest tests/test_gelu.py. Benchmark: python bench/run.py (gelu); static report: compile_specs().
"""
import functools

import torch
import triton
import triton.language as tl

from kernels._eager import cdiv, check_devices, eager_function, fast_path, impl, on_device
from kernels._triton_utils import AotSpec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 4096  # elements per program: 16 per thread at 8 warps = two 128-bit loads of bf16
NUM_WARPS = 8


@triton.jit
def _sigmoid_and_slope(z):
    """(sigmoid(z), sigmoid(z) * (1 - sigmoid(z))) from t = exp(-|z|) <= 1: no overflow, and no
    cancellation in 1 - sigmoid(z) for large z (which x * dz/dx, growing like x^3, would magnify)."""
    t = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + t)
    return tl.where(z >= 0, r, t * r), t * r * r


@triton.jit
def _gelu_fwd_kernel(
    x_ptr,  # (n,) contiguous input
    y_ptr,  # (n,) output, x's dtype
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, _ = _sigmoid_and_slope(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 sqrt(2/pi) = 1.59577...
    tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    dy_ptr,  # (n,) contiguous upstream gradient
    x_ptr,  # (n,) contiguous forward input
    dx_ptr,  # (n,) output, x's dtype
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = x * x
    s, slope = _sigmoid_and_slope(1.5957691216057308 * (x + 0.044715 * x2 * x))
    dz = 1.5957691216057308 * (1.0 + 0.134145 * x2)  # dz/dx for z = 2u; 0.134145 = 3 * 0.044715
    dx = dy * (s + x * slope * dz)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _check(name, x, dy=None, fake=False):
    """Argument checks of both ops (dy: gelu_bwd's), also run by their fake implementations: fake=True accepts
    meta tensors (shape inference; the dispatcher also sends them a meta tensor among CPU ones)."""
    tensors = (x,) if dy is None else (dy, x)
    for t in tensors:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} (triton): dtype {t.dtype} not supported; supported: float32, bfloat16, float16")
    check_devices(name, *tensors, meta_ok=fake)
    if dy is not None and dy.shape != x.shape:
        raise ValueError(f"{name} (triton): dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")


@torch.library.custom_op("gpt2k::gelu_fwd", mutates_args=())
def gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """-> gelu(x), contiguous, x's dtype."""
    _check("gelu", x)
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        with on_device(x):  # Triton launches on the current device: make it x's
            _gelu_fwd_kernel[(cdiv(n, BLOCK),)](xc, y, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


@gelu_fwd.register_fake
def _(x):
    _check("gelu", x, fake=True)
    return x.new_empty(x.shape)


@torch.library.custom_op("gpt2k::gelu_bwd", mutates_args=())
def gelu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-> dx = dy * gelu'(x), contiguous, x's dtype."""
    _check("gelu_bwd", x, dy)
    xc, dyc = x.contiguous(), dy.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        with on_device(x):
            _gelu_bwd_kernel[(cdiv(n, BLOCK),)](dyc, xc, dx, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx


@gelu_bwd.register_fake
def _(dy, x):
    _check("gelu_bwd", x, dy, fake=True)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy, bwd=gelu_bwd):
    (x,) = ctx.saved_tensors
    return bwd(dy, x)


gelu_fwd.register_autograd(_backward, setup_context=_setup_context)
_EagerGelu = eager_function(  # kernels/_eager.py: the same, without the dispatcher, for eager calls
    gelu_fwd, _setup_context, functools.partial(_backward, bwd=impl(gelu_bwd)), "_EagerGelu")


def gelu(x):
    """Same as kernels.reference.gelu: tanh-approximation GELU, output in x's dtype."""
    if fast_path(x):
        return _EagerGelu.apply(x)
    return gelu_fwd(x)


def compile_specs():
    """Both kernels as the JIT specializes them for GPT-2's MLP activation: 16384 x 3072 bf16
    (n = 50,331,648, divisible by 16), 16-byte aligned pointers."""
    consts = {"BLOCK": BLOCK}
    return [
        AotSpec(name="gelu_fwd bf16 16384x3072", fn=_gelu_fwd_kernel,
                signature={"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                constexprs=consts, aligned=("x_ptr", "y_ptr", "n"), num_warps=NUM_WARPS),
        AotSpec(name="gelu_bwd bf16 16384x3072", fn=_gelu_bwd_kernel,
                signature={"dy_ptr": "*bf16", "x_ptr": "*bf16", "dx_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                constexprs=consts, aligned=("dy_ptr", "x_ptr", "dx_ptr", "n"), num_warps=NUM_WARPS),
    ]
