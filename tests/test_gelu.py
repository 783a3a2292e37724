"""kernels/gelu.py (Triton tanh-GELU) against kernels/reference.py and float64, forward and gradient.

Rule (tests/numerics.py): max error against float64 at most 2x that of the reference op in the same dtype,
plus a small atol. float64 and integer inputs are refused (the kernel computes in fp32 by design).
The AOT compile check of both gelu kernels runs in tests/test_layernorm.py (one compile subprocess
for the two modules).
"""
import math
import os

import pytest
import torch

from kernels import gelu as gl
from kernels import reference as ref
from numerics import assert_close

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def truncate_bf16(t):
    """fp32 -> bf16 rounding toward zero, as Triton 3.8's interpreter casts (a GPU rounds to nearest)."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _grads(fn, x, dy):
    x = x.detach().requires_grad_()  # detach keeps the strides
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad


def _gelu64(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# The two tight-atol tests below: 2x the reference's error in the interpreter (NumPy's exp and division are
# correctly rounded); on a GPU, Triton's tl.exp (ex2.approx) and fp32 `/` (div.full) add a few ulps that
# PyTorch's CUDA expf does not, so 4x there. A wrong constant (0.04471 for 0.044715) is ~7x off.
TIGHT_FACTOR = 2.0 if INTERPRET else 4.0


def check(x, dy=None, atol=1e-6, factor=2.0):
    dy = torch.randn_like(x) if dy is None else dy
    out = _grads(gl.gelu, x, dy)
    base = _grads(ref.gelu, x, dy)
    if INTERPRET and x.dtype == torch.bfloat16:
        # the interpreter truncates the kernel's fp32 -> bf16 stores: compare with the reference in
        # fp32, truncated the same way
        base = tuple(truncate_bf16(t) for t in _grads(ref.gelu, x.float(), dy.float()))
    truth = _grads(_gelu64, x.double(), dy.double())
    for name, o, bl, t in zip(("y", "dx"), out, base, truth):
        assert o.dtype == x.dtype and o.shape == x.shape
        assert_close(o, t, bl, factor=factor, atol=atol * max(1.0, t.abs().max().item()), name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1000), (4099,), (2, 3, 4099), (64, 3072)])
def test_parity(dtype, shape, device):
    check((torch.randn(shape, device=device) * 3).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tails_and_zero(dtype, device):
    """Large |x| (gelu -> x or -> 0, derivative -> 1 or -> 0) and exact zeros stay finite and accurate."""
    x = torch.cat([torch.linspace(-30, 30, 601), torch.zeros(3), torch.tensor([-100.0, 100.0, -1e-3, 1e-3])])
    check(x.to(device=device, dtype=dtype))


def test_dense_range_tight_atol(device):
    """Over [-5, 5], where gelu bends, fp32 y and dx within 2x the reference's error with a negligible atol:
    test_parity's atol, scaled with max |y| of wide random inputs (~1e-5), lets a wrong constant through
    (0.04471 for 0.044715 moves y by ~3e-6 near x = 2; the reference's error there is ~4e-7)."""
    check(torch.linspace(-5, 5, 4001, device=device), atol=1e-9, factor=TIGHT_FACTOR)


def _gelu_sigmoid(x):
    return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x**3))


def test_negative_tail_has_no_cancellation(device):
    """For x < 0 the kernel's sigmoid comes from t = exp(-|z|) as t / (1 + t), free of the cancellation in
    0.5 x (1 + tanh(u)) (F.gelu's fp32 error here, ~1.5e-7 in y, is 10x the kernel's) or in 1 - sigmoid(-z).
    Baseline: the same sigmoid formula in fp32 PyTorch (x * torch.sigmoid(z)), forward and autograd."""
    x = torch.linspace(-12, -2, 2001, device=device)
    dy = torch.randn_like(x)
    out = _grads(gl.gelu, x, dy)
    base = _grads(_gelu_sigmoid, x, dy)
    truth = _grads(_gelu64, x.double(), dy.double())
    for name, o, bl, t in zip(("y", "dx"), out, base, truth):
        assert_close(o, t, bl, factor=TIGHT_FACTOR, atol=1e-9, name=name)


def test_non_contiguous(device):
    x = torch.randn(1000, 7, device=device).t()  # (7, 1000), column-major
    dy = torch.randn(7, 2000, device=device)[:, ::2]  # strided
    assert not x.is_contiguous() and not dy.is_contiguous()
    check(x, dy)


def test_empty(device):
    y, dx = _grads(gl.gelu, torch.empty(0, 5, device=device), torch.empty(0, 5, device=device))
    assert y.shape == (0, 5) and dx.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, device):
    x = torch.randn(3, 50, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.gpt2k.gelu_fwd.default, (x,))
    torch.library.opcheck(torch.ops.gpt2k.gelu_bwd.default, (torch.randn_like(x), x.detach()))


def test_torch_compile_traces_the_op(device):
    x = torch.randn(4, 33, device=device)
    compiled = torch.compile(gl.gelu, backend="aot_eager", fullgraph=True)
    out, expect = _grads(compiled, x, torch.ones_like(x)), _grads(gl.gelu, x, torch.ones_like(x))
    for a, c in zip(out, expect):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_bad_dtype_raises(dtype, device):
    with pytest.raises(TypeError, match="supported: float32, bfloat16, float16"):
        gl.gelu(torch.ones(4, device=device, dtype=dtype))


def test_bad_gradient_shape_raises(device):
    with pytest.raises(ValueError, match="dy shape"):
        torch.ops.gpt2k.gelu_bwd(torch.ones(3, device=device), torch.ones(4, device=device))
    with pytest.raises(ValueError, match="dy shape"):  # the fake implementation checks it too (meta: shapes only)
        torch.ops.gpt2k.gelu_bwd(torch.ones(3, device="meta"), torch.ones(4, device="meta"))


def test_a_meta_tensor_among_real_ones_raises(device):
    """A meta argument sends the call to the fake implementation: it checks the devices as the op does."""
    x = torch.ones(4, device=device)
    for args in ((x.to("meta"), x), (x, x.to("meta"))):
        with pytest.raises(ValueError, match="different devices"):
            torch.ops.gpt2k.gelu_bwd(*args)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: CPU tensors are refused outside the interpreter")
def test_cpu_tensor_refused_on_gpu_machine():
    with pytest.raises(ValueError, match="supported: CUDA tensors"):
        gl.gelu(torch.randn(8))
