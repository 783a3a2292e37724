"""Fused softmax + cross-entropy + its gradient (Triton): the `triton` backend's cross_entropy.

What is fused: per row, one sweep over the logits computes the running max and sum of exp (online
softmax, fp32) and picks out logit[target]; loss = logsumexp - logit[target]. When a gradient is
needed a second sweep writes dlogits = softmax - onehot(target), in place over the logits or into a
new buffer, so the backward pass is only a scale by grad_output / count (the cross_entropy op folds
1/count into the kernel, so a half-precision gradient is rounded once, as the reference's is;
backward scales by grad_output in place and skips the pass when it is 1; fused_ce_ leaves the
scale to its caller). Unfused eager PyTorch writes the fp32 copy, the
log-softmax, its gradient and the cast back: about 8 passes over N x V.

Floor: read the logits once and write dlogits once (forward+backward); the second sweep re-reads
the row, which usually still sits in L2 (one 50304-wide bf16 row is 100 KB). For N=16384,
V=50304, bf16: 1.65 GB read + 1.65 GB written.

Rows: one program per row, column blocks of BLOCK. Ignored rows (target == ignore_index) read
nothing and write loss 0 and a zero gradient. Padded columns (vocab_size <= col < n_cols) count as
-inf (probability 0) and get gradient 0; they are masked after a load over the full (16-aligned)
row width so that the loads stay 128-bit.

Invalid rows are marked, not raised, inside the kernel: a row whose real logits are all -inf (or
that contains NaN/+inf) gets loss NaN (its logsumexp is -inf or NaN), and so does a target outside
[0, vocab_size). `fused_ce_` returns the NaN sum; the ops check the summed loss once per call (one
4-byte device-to-host read) and raise a ValueError saying which case it was. A -inf logit at the
target of an otherwise finite row is a legitimate +inf loss, as in F.cross_entropy.

Test:   pytest tests/test_cross_entropy.py   (Triton's interpreter without a GPU)
Bench:  python bench/run.py cross_entropy     (GPU)
"""
import functools
import os

import torch
import triton
import triton.language as tl

from kernels._eager import auxiliary_outputs, cdiv, eager_function, fast_path, impl, next_power_of_2, on_device
from kernels.linear_cross_entropy import check_loss, chunked_linear_cross_entropy

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _ce_kernel(
    in_ptr,  # (N, n_cols) logits, row stride stride_in
    out_ptr,  # (N, n_cols) dlogits (may be in_ptr: in place), row stride stride_out
    target_ptr,  # (N,) int64
    loss_ptr,  # (N,) fp32 per-row loss
    scale_ptr,  # (1,) fp32 factor for dlogits (1/count), read only when HAS_SCALE
    stride_in,
    stride_out,
    n_vocab,  # real columns: [0, n_vocab)
    n_cols,  # buffer width (>= n_vocab)
    ignore_index,
    BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    in_ptr += row * stride_in
    out_ptr += row * stride_out
    target = tl.load(target_ptr + row)
    offs = tl.arange(0, BLOCK)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                tl.store(out_ptr + cols, zero, mask=cols < n_cols)
    else:
        # Sweep 1: running max m (a scalar per block) and per-lane sums of exp(x - m).
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)  # an fp32 scalar -inf
        s = tl.zeros([BLOCK], dtype=tl.float32)
        x_target = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            x = tl.load(in_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            x = tl.where(cols < n_vocab, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no -inf - -inf
            s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            x_target += tl.where(cols == target, x, 0.0)
            m = m_new
        lse = m + tl.log(tl.sum(s, axis=0))  # all -inf row: -inf + log(0) = -inf -> loss NaN below
        valid = (target >= 0) & (target < n_vocab)
        loss = tl.where(valid, lse - tl.sum(x_target, axis=0), float("nan"))
        loss = tl.where(lse == float("-inf"), float("nan"), loss)
        tl.store(loss_ptr + row, loss)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr) if HAS_SCALE else 1.0
            # Sweep 2: dlogits = exp(x - lse) - onehot(target); padded columns load as -inf -> 0.
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                x = tl.load(in_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
                x = tl.where(cols < n_vocab, x, float("-inf"))
                p = tl.exp(x - lse)
                g = tl.where(cols == target, p - 1.0, p) * scale
                tl.store(out_ptr + cols, g.to(out_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _scale_kernel(
    ptr,  # (numel,) dlogits, scaled in place
    scale_ptr,  # (1,) fp32 grad_output
    numel,
    BLOCK: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    if scale != 1.0:  # the usual loss.backward(): nothing to read or write
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(ptr + offs, mask=offs < numel).to(tl.float32)
        tl.store(ptr + offs, (x * scale).to(ptr.dtype.element_ty), mask=offs < numel)


_SCALE_BLOCK = 2048


def _config(n_cols):
    """(BLOCK, num_warps): 4096-wide blocks (16 elements per thread at 8 warps) for GPT-2's vocab."""
    block = min(4096, next_power_of_2(max(n_cols, 16)))
    return block, (8 if block >= 2048 else 4 if block >= 512 else 1)


def _check(logits, targets, vocab_size, where, fake=False):
    """The op's checks; fake=True (its fake implementation, which also receives a meta tensor among CPU ones):
    meta logits are fine (shape inference)."""
    if logits.dim() != 2:
        raise ValueError(f"{where}: logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"{where}: logits dtype {logits.dtype} is not supported (float32, bfloat16, float16)")
    interpreted = logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if logits.device.type != "cuda" and not interpreted and not (fake and logits.device.type == "meta"):
        raise ValueError(f"{where}: logits are on {logits.device}; the Triton kernel runs on a CUDA GPU "
                         "(or on the CPU when TRITON_INTERPRET=1 was set before importing triton)")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{where}: targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{where}: targets must be int64, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"{where}: targets on {targets.device} but logits on {logits.device}")
    if not 1 <= vocab_size <= logits.shape[1]:
        raise ValueError(f"{where}: vocab_size {vocab_size} must be in [1, {logits.shape[1]}] (the logits' width)")


def _launch(logits, targets, ignore_index, vocab_size, out, scale=None):
    """Per-row fp32 losses; writes dlogits (times `scale`, a 1-element fp32 tensor, if given) into
    `out` (may be `logits`) unless out is None."""
    n, n_cols = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return losses
    targets = targets.contiguous()  # the kernel reads targets[row] with unit stride
    block, num_warps = _config(n_cols)
    grad = out if out is not None else logits  # unused pointer when WRITE_GRAD is False
    with on_device(logits):  # Triton launches on the current device: make it the logits'
        _ce_kernel[(n,)](
            logits, grad, targets, losses, losses if scale is None else scale,  # scale unused without HAS_SCALE
            logits.stride(0), grad.stride(0), vocab_size, n_cols, ignore_index,
            BLOCK=block, WRITE_GRAD=out is not None, HAS_SCALE=scale is not None, num_warps=num_warps,
        )
    return losses


def fused_ce_(logits, targets, ignore_index, vocab_size):
    """Sum of per-row losses (fp32, 0-d) over non-ignored rows; OVERWRITES `logits` (N, Vp), contiguous
    fp32/bf16/fp16, with the unscaled gradient softmax - onehot(target) on real columns, 0 on padded
    columns and ignored rows. Invalid rows (all -inf, NaN, target out of range) make the sum NaN;
    callers check it once (linear_cross_entropy.check_loss). Deterministic: per-row losses, then torch's sum."""
    _check(logits, targets, vocab_size, "fused_ce_")
    if not logits.is_contiguous():
        raise ValueError("fused_ce_: logits must be contiguous (it overwrites them in place)")
    return _launch(logits, targets, ignore_index, vocab_size, out=logits).sum()


# ---- torch op ------------------------------------------------------------------------------------

@torch.library.custom_op("gpt2k::cross_entropy_triton", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, vocab_size: int,
                      compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss fp32 0-d, dloss/dlogits (N, Vp) or an empty tensor when not compute_grad).

    The kernel writes dlogits already divided by count, so that a bf16/fp16 gradient is rounded
    once, as the reference's is; backward then only multiplies by grad_output (exact when it is 1)."""
    _check(logits, targets, vocab_size, "cross_entropy")
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    count = (targets != ignore_index).sum().clamp(min=1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_grad else None
    inv_count = (1.0 / count.float()).reshape(1)
    loss_sum = _launch(x, targets, ignore_index, vocab_size, out, scale=inv_count).sum()
    check_loss(loss_sum, targets, ignore_index, vocab_size, "cross_entropy")
    dlogits = out if compute_grad else logits.new_empty((0,))
    return loss_sum / count, dlogits


@_cross_entropy_op.register_fake
def _(logits, targets, ignore_index, vocab_size, compute_grad):
    _check(logits, targets, vocab_size, "cross_entropy", fake=True)
    loss = logits.new_empty((), dtype=torch.float32)
    dlogits = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss, dlogits


@torch.library.custom_op("gpt2k::cross_entropy_triton_scale_", mutates_args=("dlogits",))
def _scale_(dlogits: torch.Tensor, grad_output: torch.Tensor) -> None:
    """dlogits *= grad_output (a 0-d fp32 tensor), in place; reads nothing when grad_output == 1."""
    n = dlogits.numel()
    if n:
        with on_device(dlogits):
            _scale_kernel[(cdiv(n, _SCALE_BLOCK),)](dlogits, grad_output, n, BLOCK=_SCALE_BLOCK, num_warps=4)


@_scale_.register_fake
def _(dlogits, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    auxiliary_outputs(ctx, output[1])  # dlogits
    ctx.rows = inputs[0].shape[0]


def _backward(ctx, grad_loss, _grad_dlogits, scale_=_scale_):
    # Eager: scale the saved dlogits in place and hand them on: no second N x V buffer, and no pass
    # over it at all when grad_output is 1. The price: one backward per forward; a second one
    # (retain_graph=True) fails autograd's saved-tensor version check instead of scaling twice.
    # Traced (torch.compile / AOTAutograd: tensor subclasses), out of place: the partitioner cannot
    # take a backward that mutates a saved forward output.
    (dlogits,) = ctx.saved_tensors
    if dlogits.numel() == 0 and ctx.rows > 0:
        raise RuntimeError("cross_entropy: backward needs the forward to run with compute_grad=True")
    if type(dlogits) is not torch.Tensor:  # in fp32, rounded once (an fp16 GradScaler scale must not become inf)
        return (dlogits.float() * grad_loss).to(dlogits.dtype), None, None, None, None
    scale_(dlogits, grad_loss.float().contiguous())
    return dlogits, None, None, None, None


def _scale_eager_(dlogits, grad_output):
    impl(_scale_)(dlogits, grad_output)
    torch.autograd.graph.increment_version(dlogits)  # what the custom op does for a mutated argument


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
_EagerCrossEntropy = eager_function(  # kernels/_eager.py: the same, without the dispatcher, for eager calls
    _cross_entropy_op, _setup_context, functools.partial(_backward, scale_=_scale_eager_), "_EagerCrossEntropy")


def cross_entropy(logits, targets, ignore_index=-1, vocab_size=None):
    """Mean cross-entropy over targets != ignore_index (0 if all are ignored); logits (N, Vp), of
    which the first `vocab_size` columns are real. Same semantics as kernels.reference.cross_entropy."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    if fast_path(logits):
        return _EagerCrossEntropy.apply(logits, targets, ignore_index, vocab_size, compute_grad)[0]
    loss, _ = _cross_entropy_op(logits, targets, ignore_index, vocab_size, compute_grad)
    return loss


def linear_cross_entropy(hidden, weight, targets, ignore_index=-1, vocab_size=None):
    """cross_entropy(hidden @ weight.T, ...) in row chunks that never hold the full logits."""
    return chunked_linear_cross_entropy(hidden, weight, targets, ignore_index, vocab_size, backend="triton")


def compile_specs():
    """Each kernel variant at bf16 logits and GPT-2's padded vocab (the grid is one program per row)."""
    from kernels._triton_utils import AotSpec

    block, num_warps = _config(50304)
    sig = {"in_ptr": "*bf16", "out_ptr": "*bf16", "target_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
           "stride_in": "i32", "stride_out": "i32", "n_vocab": "i32", "n_cols": "i32", "ignore_index": "i32",
           "BLOCK": "constexpr", "WRITE_GRAD": "constexpr", "HAS_SCALE": "constexpr"}
    aligned = ("in_ptr", "out_ptr", "target_ptr", "loss_ptr", "stride_in", "stride_out", "n_cols")
    variants = [("fwd+grad/count (cross_entropy op)", True, True), ("fwd+grad in place (fused_ce_)", True, False),
                ("loss only (no grad)", False, False)]
    specs = [AotSpec(f"cross_entropy {label} bf16 V=50304 BLOCK={block}", _ce_kernel, sig,
                     {"BLOCK": block, "WRITE_GRAD": grad, "HAS_SCALE": scale}, aligned=aligned, num_warps=num_warps)
             for label, grad, scale in variants]
    scale_sig = {"ptr": "*bf16", "scale_ptr": "*fp32", "numel": "i32", "BLOCK": "constexpr"}
    specs.append(AotSpec(f"cross_entropy backward scale bf16 BLOCK={_SCALE_BLOCK}", _scale_kernel, scale_sig,
                         {"BLOCK": _SCALE_BLOCK}, aligned=("ptr", "numel"), num_warps=4))
    return specs
