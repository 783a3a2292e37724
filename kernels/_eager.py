"""The eager fast path shared by the kernel modules.

Each op is a torch.library custom op with a registered autograd formula: that is what torch.compile
traces and opcheck checks. An eager call through it crosses several Python layers before the first
kernel launch (dispatcher -> the custom op's autograd wrapper -> redispatch -> the implementation, and
the same again for the backward op). At GPT-2 shapes on an H100 those layers cost more CPU time than
the kernels take on the GPU, so eager training is host-bound.

`eager_function(op, setup_context, backward)` builds a plain torch.autograd.Function that calls the
op's own Python implementation with the same setup_context and backward formula: the same kernels,
the same launches, bitwise the same results, fewer layers. The public functions (layer_norm, gelu,
attention, cross_entropy) use it when `fast_path()` is true: eager mode and ENABLED. Under
torch.compile they call the custom ops, which the compiler traces.

Measured with `python -m bench.host_overhead` (CPU, every kernel launch stubbed out, so only the Python
work around the kernels is timed).
"""
import torch

ENABLED = True  # tests turn it off to compare both paths


def fast_path():
    """True in eager mode (not while torch.compile traces) when the fast path is enabled."""
    return ENABLED and not torch.compiler.is_compiling()


def impl(op):
    """The Python implementation behind a torch.library custom op (what the dispatcher ends up calling)."""
    return op._init_fn


def eager_function(op, setup_context, backward, name):
    """A torch.autograd.Function running `op` in forward (a torch.library custom op: its Python
    implementation; any other callable, e.g. a C++ op, as it is, below autograd), then
    `setup_context(ctx, inputs, output)` as registered with the op's autograd; `backward(ctx, *grads)` is
    the op's backward formula (for a custom op it should call the backward op's implementation, `impl(bwd_op)`)."""
    fn = impl(op) if hasattr(op, "_init_fn") else op

    def forward(ctx, *inputs):
        output = fn(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
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
