"""The eager fast path shared by the kernel modules.

Each op is a torch.library custom op with a registered autograd formula: that is what torch.compile
traces and opcheck checks. An eager call through it crosses several Python layers before the first
kernel launch (dispatcher -> the custom op's autograd wrapper -> redispatch -> the implementation, and
the same again for the backward op). At GPT-2 shapes on an H100 those layers cost more CPU time than
the kernels take on the GPU, so eager training is host-bound.

`eager_function(op, setup_context, backward)` builds a plain torch.autograd.Function that calls the
op's own Python implementation with the same setup_context and backward formula: the same kernels,
the same launches, bitwise the same results, fewer layers. The public functions (layer_norm, gelu,
attention, cross_entropy) use it when `fast_path(x)` is true: eager mode and ENABLED. Under
torch.compile they call the custom ops, which the compiler traces.

Measured with `python -m bench.host_overhead` (CPU, every kernel launch stubbed out, so only the Python
work around the kernels is timed).

Double backward: every backward here launches Triton kernels, which autograd cannot differentiate. The
custom ops raise on a second derivative (their backward ops have no autograd formula); the fast path's
backward is wrapped by `once_differentiable` so it raises too, instead of returning first derivatives
that silently drop every higher-order term.

Devices: Triton launches on the *current* CUDA device and its current stream, not on the tensors' device.
Every launch in the kernel modules runs under `on_device(t)`: a no-op when t's device is already current.
"""
import contextlib
import functools
import os

import torch
from torch._C import _functions

ENABLED = True  # tests turn it off to compare both paths


def fast_path(t):
    """True in eager mode (not while torch.compile traces) when the fast path is enabled, for an op whose
    main input is t: not for meta tensors (shape inference), which take the op and its fake implementation."""
    return ENABLED and not t.is_meta and not torch.compiler.is_compiling()


def impl(op):
    """The Python implementation behind a torch.library custom op (what the dispatcher ends up calling)."""
    return op._init_fn


_SAME_DEVICE = contextlib.nullcontext()  # stateless: one instance serves every call


def on_device(t):
    """A context under which a Triton launch for tensor t runs on t's device (and that device's current
    stream): Triton launches on the current CUDA device, whatever device the tensors are on. A no-op context
    (no device switch) when t is not a CUDA tensor or its device is already the current one (~0.5 us)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


def check_devices(name, *tensors, meta_ok=False):
    """Where our Triton kernels run: every tensor on one device, which is CUDA, or the CPU under
    TRITON_INTERPRET=1 (Triton's interpreter), or meta when meta_ok (fake implementations: shapes only).
    Else ValueError naming the op `name`."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"{name} (triton): tensors on different devices ({dev} and {t.device})")
    if dev.type == "cuda" or (dev.type == "meta" and meta_ok) or (dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return
    raise ValueError(f"{name} (triton): tensors on {dev} are not supported; supported: CUDA tensors, "
                     "or CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter)")


def once_differentiable(backward, name="backward"):
    """`backward` for a torch.autograd.Function whose backward cannot itself be differentiated (it launches
    kernels). Like torch.autograd.function.once_differentiable, but stricter: torch's version only guards
    when an incoming gradient requires grad, so `torch.autograd.grad(f(x).sum(), x, create_graph=True)`
    (a gradient of ones) still returned a first derivative with no graph, and a later backward through it
    silently dropped the second-order terms. Here, whenever the backward runs with grad mode on (that is,
    under create_graph=True), every returned gradient gets a node that raises on backward, as the custom
    op's path does. A plain backward (grad mode off) calls `backward` directly: no added cost."""
    message = (f"{name}: double backward (create_graph=True, a derivative of a gradient) is not supported: "
               "the backward launches Triton kernels and has no derivative of its own "
               "(trying to differentiate twice a function marked once_differentiable)").encode()

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        # Gradients are floating-point tensors or None; each tensor gets DelayedError as its grad_fn.
        wrapped = _functions.DelayedError(message, len(outputs))(
            *(None if o is None else o.detach().requires_grad_() for o in outputs))
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        return wrapped[0] if single else wrapped

    return wrapper


def eager_function(op, setup_context, backward, name):
    """A torch.autograd.Function running `op` in forward (a torch.library custom op: its Python
    implementation; any other callable, e.g. a C++ op, as it is, below autograd), then
    `setup_context(ctx, inputs, output)` as registered with the op's autograd; `backward(ctx, *grads)` is
    the op's backward formula (for a custom op it should call the backward op's implementation, `impl(bwd_op)`).
    The backward is once_differentiable: a double backward raises (see above)."""
    fn = impl(op) if hasattr(op, "_init_fn") else op

    def forward(ctx, *inputs):
        output = fn(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(once_differentiable(backward, name)),
        "__doc__": "Eager fast path: an op's implementation and autograd formula, without the dispatcher.",
    })


def auxiliary_outputs(ctx, *outputs):
    """In an op's setup_context: `outputs` (saved statistics, a loss's dlogits...) are not differentiable,
    and no output's missing gradient is materialized: backward gets None, not a zero-filled tensor of the
    output's shape per call (1.65 GB for the cross-entropy's dlogits at GPT-2's 16384 x 50304 bf16; a
    memset launch for LayerNorm's mean / rstd or attention's lse). So a backward must accept None for any
    output that may go unused (add_layer_norm's s or y)."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def cdiv(a, b):
    """ceil(a / b) for ints (triton.cdiv is a constexpr function: ~2 us per host call in triton 3.8)."""
    return -(-a // b)


def next_power_of_2(n):
    """Smallest power of two >= n (n >= 1), without triton.next_power_of_2's call overhead."""
    return 1 << (n - 1).bit_length()
