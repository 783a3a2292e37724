"""Chunked lm_head + cross-entropy: loss and gradients without ever holding the full (N, V) logits.

Shared by the `triton` and `cuda` backends; only the fused softmax-cross-entropy differs
(kernels.cross_entropy.fused_ce_ or kernels.classifier.fused_ce_, same contract, imported lazily).
For each chunk of rows, in the forward pass:

    logits = h_c @ W^T                     (M, V)  cuBLAS through torch
    loss  += fused_ce_(logits, ...)        logits overwritten in place by dlogits = softmax - onehot
    dh_c   = dlogits @ W                   (M, C)
    dW    += dlogits^T @ h_c               (V, C)  accumulated in fp32 across chunks

and backward only scales the stored dh, dW by grad_output / count; except that a dW in a lower precision
than fp32 is divided by the count in fp32 before it is rounded into the weight's dtype (an fp16 dW summed
over 16k rows would overflow first), and backward then multiplies it by grad_output alone.

Memory: one chunk of logits (default <= 256 MiB) + dW in fp32 + dh, instead of the N x V logits,
their fp32 copy, the log-softmax and its gradient (several GB at N=16384). FLOPs: the same three
GEMMs as unfused. Without any gradient wanted (eval) the GEMMs for dh and dW are skipped, but the
fused kernel still writes dlogits over its chunk (the shared fused_ce_ contract).

Invalid rows (real logits all -inf, NaN, a target outside [0, V)) give the fused kernel a NaN
loss; the summed loss is checked once per call (one scalar device-to-host read) and raises.

Precision (autocast): under autocast the matmuls take the autocast dtype (bf16), as F.linear would
there; without autocast, hidden and weight must have the same dtype and that is used. The logits
and dlogits are in that dtype (as F.linear's output and its gradient are); every reduction over
rows is fp32: the loss, and dW across chunks (an fp32 buffer that cuBLAS accumulates into through
torch.addmm(..., out_dtype=float32); a torch without that overload rounds each chunk's product to
bf16 once before the fp32 sum). Gradients come back in hidden's and weight's own dtypes (fp32 for
the model's fp32 parameters).

Test:   pytest tests/test_linear_cross_entropy.py
Bench:  python bench/run.py linear_cross_entropy   (GPU: peak memory and time vs F.linear + loss)
"""
import torch

from kernels._eager import auxiliary_outputs

CHUNK_BYTES = 256 * 2**20  # one chunk's logits at most (the default chunk_rows)


def default_chunk_rows(n_cols, dtype):
    """Rows per chunk so that one chunk of logits is <= CHUNK_BYTES, a multiple of 128 rows."""
    rows = CHUNK_BYTES // (n_cols * torch.empty((), dtype=dtype).element_size())
    return max(128, rows // 128 * 128)


def _fused_ce(backend):
    if backend == "triton":
        from kernels.cross_entropy import fused_ce_
    elif backend == "cuda":
        from kernels.classifier import fused_ce_
    else:
        raise ValueError(f"linear_cross_entropy: unknown backend {backend!r} (triton, cuda)")
    return fused_ce_


CHECK_ROWS = True  # kernels.set_loss_row_checks(False) turns the read-back below off (see its docstring)


def check_loss(loss_sum, targets, ignore_index, vocab_size, where):
    """Raise ValueError when the summed loss is NaN, saying why. Costs one device-to-host read of a
    scalar per call (the fused kernels mark invalid rows with a NaN loss instead of syncing). Skipped
    while a CUDA graph is being captured (a read-back cannot be captured): the loss is then NaN."""
    if not CHECK_ROWS or (loss_sum.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if not torch.isnan(loss_sum).item():
        return
    kept = targets[targets != ignore_index]
    bad = kept[(kept < 0) | (kept >= vocab_size)]
    if bad.numel():
        raise ValueError(f"{where}: target {bad[0].item()} is outside [0, {vocab_size}) and is not "
                         f"ignore_index ({ignore_index})")
    raise ValueError(f"{where}: a row's real logits are all -inf, or contain NaN or +inf: the loss is undefined")


def _addmm_fp32(acc, a, b):
    """acc (fp32) += a @ b, summed in fp32 across calls; returns the result (may be a new tensor)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if not a.is_cuda:
        return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # CPU: exact products of half inputs in fp32
    if hasattr(torch.ops.aten.addmm, "dtype"):  # cuBLAS bf16/fp16 x bf16/fp16 -> fp32 C, beta=1
        return torch.addmm(acc, a, b, out_dtype=acc.dtype)
    return acc.add_(a @ b)  # older torch: each chunk's product rounded once to a's dtype, summed in fp32


@torch.library.custom_op("gpt2k::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, vocab_size: int,
    backend: str, chunk_rows: int, compute_dtype: torch.dtype, grad_hidden: bool, grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss fp32 0-d; dh (N, C) of the summed loss, or empty; dW (V, C) or empty: of the mean loss
    when weight is not fp32, else of the summed loss: backward divides those by the count)."""
    _check(hidden, weight, targets, backend)
    fused_ce_ = _fused_ce(backend)
    n = hidden.shape[0]
    count = (targets != ignore_index).sum().clamp(min=1)
    with torch.autocast(hidden.device.type, enabled=False):  # our dtypes are decided; keep them
        w = weight.to(compute_dtype)
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else hidden.new_empty((0,))
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows].to(compute_dtype)
            logits = h @ w.t()  # (M, V), contiguous
            loss_sum += fused_ce_(logits, targets[start:start + chunk_rows], ignore_index, vocab_size)
            if grad_hidden:
                dh[start:start + chunk_rows] = logits @ w  # dlogits @ W
            if grad_weight:
                dw = _addmm_fp32(dw, logits.t(), h)  # += dlogits^T @ h
            del logits
    check_loss(loss_sum, targets, ignore_index, vocab_size, "linear_cross_entropy")
    if not grad_weight:
        dw = weight.new_empty((0,))
    elif weight.dtype != torch.float32:  # divide in fp32, then round once into weight's dtype
        dw = torch.div(dw, count, out=torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))
    return loss_sum / count, dh, dw


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, vocab_size, backend, chunk_rows, compute_dtype, grad_hidden,
      grad_weight):
    _check(hidden, weight, targets, backend)
    loss = hidden.new_empty((), dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty((0,))
    dw = weight.new_empty(weight.shape) if grad_weight else weight.new_empty((0,))
    return loss, dh, dw


def _setup_context(ctx, inputs, output):
    targets, ignore_index = inputs[2], inputs[3]
    ctx.save_for_backward(output[1], output[2], targets)
    auxiliary_outputs(ctx, output[1], output[2])  # dh, dW
    ctx.ignore_index = ignore_index
    ctx.dw_is_sum = inputs[1].dtype == torch.float32  # an fp32 dW is stored undivided by the count


def _backward(ctx, grad_loss, _grad_dh, _grad_dw):
    dh, dw, targets = ctx.saved_tensors
    for i, g, name in ((0, dh, "hidden"), (1, dw, "weight")):
        if ctx.needs_input_grad[i] and g.numel() == 0 and targets.numel() > 0:
            raise RuntimeError(f"linear_cross_entropy: the gradient for {name} was not computed in forward "
                               f"(grad_{name}=False)")
    scale = grad_loss.float() / (targets != ctx.ignore_index).sum().clamp(min=1)
    # in fp32, rounded once: (a half tensor times an fp32 scalar tensor would round the scale to half first)
    grad_h = (dh.float() * scale).to(dh.dtype) if ctx.needs_input_grad[0] else None
    grad_w = (dw.float() * (scale if ctx.dw_is_sum else grad_loss.float())).to(dw.dtype) if ctx.needs_input_grad[1] else None
    return grad_h, grad_w, None, None, None, None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _check(hidden, weight, targets, backend):
    """Checks of the public function, which the op and its fake run too (a meta tensor among CPU ones makes
    the dispatcher call the fake: it must not return uninitialized results)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (N, C) and weight (V, C) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets must have shape ({hidden.shape[0]},), "
                         f"got {tuple(targets.shape)}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: hidden ({hidden.device}), weight ({weight.device}) and targets "
                         f"({targets.device}) must be on one device")
    if backend not in ("triton", "cuda"):
        raise ValueError(f"linear_cross_entropy: unknown backend {backend!r} (triton, cuda)")


def _compute_dtype(hidden, weight):
    device = hidden.device.type
    if device != "meta" and torch.is_autocast_enabled(device):  # (autocast has no meta device)
        return torch.get_autocast_dtype(device)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                         "use the same dtype, or autocast")
    return hidden.dtype


def chunked_linear_cross_entropy(hidden, weight, targets, ignore_index=-1, vocab_size=None, backend="triton",
                                 chunk_rows=None):
    """cross_entropy(hidden @ weight.T, targets, ignore_index, vocab_size), computed `chunk_rows` rows at
    a time (default: chunks of <= 256 MiB of logits). hidden (N, C), weight (Vp, C), targets (N,)."""
    _check(hidden, weight, targets, backend)
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    targets = targets.contiguous()  # the fused kernels read per-chunk slices of it with unit stride
    dtype = _compute_dtype(hidden, weight)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], dtype)
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    grad = torch.is_grad_enabled()
    loss, _, _ = _linear_cross_entropy_op(hidden, weight, targets, ignore_index, vocab_size, backend, chunk_rows,
                                          dtype, grad and hidden.requires_grad, grad and weight.requires_grad)
    return loss
