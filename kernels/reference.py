"""Pure-PyTorch reference ops: the test oracle AND the `torch` backend (one copy, so they cannot drift).

Every fused kernel in this package computes one of these functions. Tests compare each kernel against
these (and these against an independent float64 computation in tests/test_reference.py).

Conventions shared by all backends:
  layer_norm(x, weight, bias, eps)   normalizes over the last dim; statistics in fp32; output in x's dtype.
  add_layer_norm(x, residual, weight, bias, eps)
                                     (s, layer_norm(s)), s = x + residual in PyTorch's promoted dtype;
                                     the layer_norm backend's fused residual add (not an op of its own).
  gelu(x)                            tanh approximation (GPT-2's "gelu_new").
  attention(q, k, v)                 causal, q/k/v (B, H, T, D), scale 1/sqrt(D).
  cross_entropy(logits, targets, ignore_index=-1, vocab_size=None)
                                     mean over targets != ignore_index, loss in fp32. Only the first
                                     `vocab_size` columns are real (GPT-2 pads 50257 -> 50304); padded
                                     columns get probability 0 and gradient 0. If every target is ignored
                                     the loss is 0 (not NaN as in F.cross_entropy): a batch of padding
                                     must not poison a run.
  linear_cross_entropy(hidden, weight, targets, ignore_index=-1, vocab_size=None)
                                     cross_entropy(hidden @ weight.T, ...): the lm_head + loss.
  adamw_step_(...)                   the AdamW update with torch.optim.AdamW semantics (decoupled decay).
  AdamW                              the `torch` backend's optimizer: torch.optim.AdamW, fused on CUDA.
"""
import math

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps=1e-5, out_dtype=None):
    # F.layer_norm wants one dtype; cast the (possibly fp32) affine params to x's dtype so the
    # output takes the input's dtype, as every backend does. out_dtype: the output's dtype instead
    # (the model passes the autocast dtype, which the next matmul casts the output to anyway).
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    y = F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return y if out_dtype is None else y.to(out_dtype)


def add_layer_norm(x, residual, weight, bias, eps=1e-5, out_dtype=None):
    """(s, layer_norm(s)) with s = x + residual: a pre-LN block's residual add and the LayerNorm after it."""
    s = x + residual
    return s, layer_norm(s, weight, bias, eps, out_dtype)


def gelu(x):
    return F.gelu(x, approximate="tanh")


def attention(q, k, v):
    # PyTorch's own fused SDPA (flash / cuDNN / memory-efficient / math, whichever it picks): the
    # strongest eager baseline. `attention_math` below is the textbook version, for benchmarks.
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def check_qkv(qkv, n_head, name="attention_qkv"):
    """(B, T, C) for a c_attn projection qkv (B, T, 3C) of n_head heads; else a ValueError / TypeError saying
    what is expected."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"{name}: qkv must be a (B, T, 3C) tensor (q, k, v side by side), got {shape}")
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
        raise ValueError(f"{name}: n_head must be an int >= 1, got {n_head!r}")
    B, T, C3 = qkv.shape
    if C3 % (3 * n_head):
        raise ValueError(f"{name}: qkv's last dim {C3} must be 3 x n_head x head_dim (n_head = {n_head})")
    return B, T, C3 // 3


def attention_qkv(qkv, n_head):
    """Causal attention straight from the c_attn projection: qkv (B, T, 3C) holds q, k, v side by side,
    each n_head heads of C / n_head; -> (B, T, C), the heads side by side again (what c_proj reads). The
    same ops as GPT-2's usual split / view / transpose around attention()."""
    B, T, C = check_qkv(qkv, n_head)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    return attention(q, k, v).transpose(1, 2).reshape(B, T, C)


def attention_math(q, k, v):
    """softmax(QK^T / sqrt(D) + causal mask) V, materializing the (T, T) scores (nanoGPT's slow path)."""
    T, D = q.shape[-2], q.shape[-1]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    return att @ v


def cross_entropy(logits, targets, ignore_index=-1, vocab_size=None):
    if vocab_size is not None and not 1 <= vocab_size <= logits.shape[-1]:
        raise ValueError(f"cross_entropy: vocab_size {vocab_size} must be in [1, {logits.shape[-1]}] (the logits' width)")
    if vocab_size is not None and vocab_size != logits.shape[-1]:
        logits = logits[..., :vocab_size]
    losses = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
    count = (targets != ignore_index).sum().clamp(min=1)
    return losses.sum() / count


def linear_cross_entropy(hidden, weight, targets, ignore_index=-1, vocab_size=None):
    return cross_entropy(F.linear(hidden, weight), targets, ignore_index, vocab_size)


@torch.no_grad()
def adamw_step_(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update in place, as torch.optim.AdamW (non-amsgrad, non-maximize) does it.

    `step` is the step count after incrementing (1 on the first update).
    """
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW, with `fused=True` by default when every parameter is on a CUDA device."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        # Materialize every group's params once: a generator would be used up by the check below.
        params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
        if "fused" not in kwargs and "foreach" not in kwargs:
            tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
            if tensors and all(p.is_cuda for p in tensors):
                kwargs["fused"] = True
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
