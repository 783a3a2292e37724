"""kernels/_eager.py: eager calls of the public functions skip the dispatcher (a plain autograd.Function
over each custom op's own implementation and autograd formula). The fast path must give bitwise the
same outputs and gradients as the custom-op path, and must really be the path taken (grad_fn names).
Host-time effect: python -m bench.host_overhead."""
import pytest
import torch

from kernels import _eager


def _layer_norm(device):
    from kernels.layernorm import layer_norm

    x = torch.randn(3, 5, 40, device=device)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    return layer_norm, (x, w, b), "_EagerLayerNorm"


def _add_layer_norm(device):
    from kernels.layernorm import add_layer_norm

    x, r = torch.randn(3, 5, 40, device=device), torch.randn(3, 5, 40, device=device).to(torch.bfloat16)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    return (lambda x, r, w, b: add_layer_norm(x, r, w, b)[1]), (x, r, w, b), "_EagerAddLayerNorm"


def _gelu(device):
    from kernels.gelu import gelu

    return gelu, (torch.randn(7, 33, device=device) * 3,), "_EagerGelu"


def _attention(device):
    from kernels.attention import attention

    q, k, v = (torch.randn(1, 2, 37, 32, device=device, dtype=torch.float16) for _ in range(3))
    return attention, (q, k, v), "_EagerAttention"


def _cross_entropy(device):
    from kernels.cross_entropy import cross_entropy

    logits, targets = torch.randn(9, 48, device=device), torch.randint(0, 45, (9,), device=device)
    targets[2] = -1
    return (lambda x: cross_entropy(x, targets, -1, 45)), (logits,), "_EagerCrossEntropy"


def _cross_entropy_cuda(device):
    from kernels import classifier

    reason = classifier.unavailable_reason()
    if reason:
        pytest.skip(f"classifier extension: {reason}")
    logits, targets = torch.randn(9, 48, device=device), torch.randint(0, 45, (9,), device=device)
    targets[2] = -1
    return (lambda x: classifier.cross_entropy(x, targets, -1, 45)), (logits,), "_EagerCrossEntropy"


def _ops():
    return pytest.mark.parametrize(
        "make", [_layer_norm, _add_layer_norm, _gelu, _attention, _cross_entropy, _cross_entropy_cuda],
        ids=["layer_norm", "add_layer_norm", "gelu", "attention", "cross_entropy_triton", "cross_entropy_cuda"])


def _run(fn, inputs):
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grad_fn = type(out.grad_fn).__name__
    out.backward(torch.randn_like(out))
    return [out.detach()] + [t.grad for t in inputs], grad_fn


@_ops()
def test_fast_path_is_taken_and_equals_the_op(make, device, monkeypatch):
    fn, inputs, eager_name = make(device)
    torch.manual_seed(1)
    fast, fast_grad_fn = _run(fn, inputs)
    monkeypatch.setattr(_eager, "ENABLED", False)
    torch.manual_seed(1)
    via_op, op_grad_fn = _run(fn, inputs)
    assert fast_grad_fn.startswith(eager_name), fast_grad_fn  # the fast path ran...
    assert not op_grad_fn.startswith(eager_name), op_grad_fn  # ...and switching it off reaches the op
    for i, (a, b) in enumerate(zip(fast, via_op)):
        assert not torch.isnan(a).any()
        assert torch.equal(a, b), f"output {i} differs between the fast path and the custom op"


def test_int_helpers_match_triton():
    import triton

    for n in (1, 2, 3, 7, 8, 1000, 1024, 1025, 50304):
        assert _eager.next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 7, 64):
            assert _eager.cdiv(n, d) == triton.cdiv(n, d)


@_ops()
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
def test_backward_gets_no_zero_filled_gradients(make, fast, device, monkeypatch):
    """Auxiliary outputs (LayerNorm's mean / rstd, attention's lse, the losses' dlogits; add_layer_norm's s
    when only y is used) get no zero-filled gradient from autograd: at GPT-2 shapes that was a 1.65 GB
    allocation and memset per cross-entropy backward, and a memset launch per LayerNorm / attention call."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(_eager, "ENABLED", fast)
    fn, inputs, _ = make(device)
    warm = [t.clone().requires_grad_() for t in inputs]
    fn(*warm).sum().backward()  # compiles (and on a GPU autotunes: do_bench zeroes a buffer) before profiling
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    dy = torch.randn_like(out)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(dy)
    zeros = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_")]
    assert not zeros, zeros
    assert all(t.grad is not None for t in inputs)
